"""Write an inference artifact from a run's latest checkpoint: no pickle, loadable in a fresh process.

    python -m launch.export --run runs/tiny [--out DIR] [--quantize int8] [--checkpoint PATH]

Artifact layout (default DIR = <run>/artifact, or <run>/artifact_int8 with --quantize int8):

    config.toml                 the run's resolved config (parallelism.ep_size reset to 1)
    manifest.json               feature order, tables, model, dtype, what is quantized, sizes, eval AUCs
    tables.safetensors          fp32 tables {table: R x C}, unsharded            (no --quantize)
    tables_int8.safetensors     {table.q: R x C uint8, table.scale_shift: R x 4}  (--quantize int8)
    dense.safetensors           the zoo model's weights, experts merged from every ep shard
    dense_program.json          torch.export program of the dense path (sparse_BI, dense_BF) -> probs_BK
    dense_program.safetensors   its weights and constants
    vocab.npz                   the id vocabularies of 'vocab' features (only when there are any)

The artifact's model routes with the inference router and skips zero-gate experts. The torch.export
program cannot do that skip (the per-(token, expert) dispatch depends on the data: torch.export stops
at it), so the program runs the dense-weighted experts: the same function up to float rounding.
With labels in the eval data (default data.eval), export scores it with the fp32 model and the
quantized one and writes both metric sets and the AUC change into the manifest.

Legend: B batch, I pooled-embedding width, F dense features, K tasks, R table rows, C table width.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from checkpoint.format import final_checkpoint, read_meta, require_complete
from embeddings.regroup import feature_order, sparse_dim
from pipeline.errors import DataError
from pipeline.vocab import VOCAB_FILE, save_vocabs
from serving.model import (
    DENSE,
    MANIFEST,
    PROGRAM,
    PROGRAM_WEIGHTS,
    TABLES_FP32,
    TABLES_INT8,
    DenseScorer,
    InferenceModel,
    ServingError,
    build_sparse,
    from_checkpoint,
    load_run_config,
    quantize_table,
    set_sparse_inference,
)
from serving.predict import predict_dataset, prediction_metrics

FORMAT = "rankmixer-inference/1"
DENSE_NOT_QUANTIZED = (
    "dense layers stay fp32: only the task towers are nn.Linear (torch.ao dynamic int8 quantization is deprecated "
    "in torch 2.13 and torchao, the maintained library, is not installed); the tokenizer, per-token FFN, routers and "
    "experts are batched per-token matmuls (baddbmm/bmm) that neither quantizes"
)


def save_program(scorer: DenseScorer, example: tuple[Tensor, Tensor], artifact: Path) -> torch.export.ExportedProgram:
    """torch.export the dense path with a dynamic batch size and write it without pickle.

    Writes `dense_program.json` (torch's ExportedProgram schema as JSON) and `dense_program.safetensors`
    (its parameters, buffers and constants; the parameter names in the metadata). Uses
    `torch._export.serde.serialize`, the serializer `torch.export.save` itself calls, leaving out the
    pickled sample inputs that `torch.export.save` would add; verified on torch 2.13.
    """
    from torch._export.serde.serialize import serialize

    batch = torch.export.Dim("B", min=1, max=1 << 20)
    prog = torch.export.export(scorer, example, dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    art = serialize(prog, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    (artifact / PROGRAM).write_bytes(art.exported_program)
    tensors = {f"state/{k}": v.detach().contiguous() for k, v in prog.state_dict.items()}
    for k, v in prog.constants.items():
        if not isinstance(v, Tensor):
            raise ServingError(f"dense program constant '{k}' is a {type(v).__name__}, not a tensor: cannot save it")
        tensors[f"const/{k}"] = v.detach().contiguous()
    params = [n for n, _ in prog.named_parameters()]
    save_file(tensors, str(artifact / PROGRAM_WEIGHTS), metadata={"parameters": json.dumps(params)})
    return prog


def _export_program(model: InferenceModel, out: Path) -> dict[str, Any]:
    """Export the dense path; report what traced, what did not, and how far the program is from eager."""
    gen = torch.Generator().manual_seed(0)
    e, n = sparse_dim(model.cfg.features), len(model.cfg.features.dense)
    x_BI, d_BF = torch.randn(64, e, generator=gen) * 0.1, torch.randn(64, n, generator=gen)
    status: dict[str, Any] = {
        "inputs": {"sparse_BI": ["B", e], "dense_BF": ["B", n]},
        "outputs": {"probs_BK": ["B", len(model.tasks)]},
    }
    sparse_path = copy.deepcopy(model.dense)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch prints the partial graph of a failed trace
            torch.export.export(DenseScorer(sparse_path), (x_BI, d_BF), strict=False)
        status["sparse_inference_exported"] = True
    except Exception as err:  # noqa: BLE001 - reported in the manifest, not fatal
        status["sparse_inference_exported"] = False
        status["sparse_inference_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    dense_path = copy.deepcopy(model.dense)
    set_sparse_inference(dense_path, False)
    try:
        prog = save_program(DenseScorer(dense_path), (x_BI, d_BF), out)
    except Exception as err:  # noqa: BLE001 - the artifact stays usable without the program
        status.update(status="failed", error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
        return status
    with torch.no_grad():
        eager = model.score_dense(x_BI, d_BF)
        traced = prog.module()(x_BI, d_BF)
    status.update(
        status="exported",
        files=[PROGRAM, PROGRAM_WEIGHTS],
        moe_path="dense-weighted experts (every expert computed, zero gates multiply by 0)"
        if model.cfg.moe.enabled
        else "no MoE",
        max_abs_diff_vs_sparse_inference=float((traced - eager).abs().max()),
    )
    return status


def _eval(models: dict[str, InferenceModel], data: str) -> dict[str, Any]:
    """Metrics of each model on `data` (labels needed), the AUC change vs fp32 and the largest prob change."""

    out: dict[str, Any] = {"data": data}
    cols = {name: predict_dataset(m, data) for name, m in models.items()}
    for name, c in cols.items():
        out[name] = prediction_metrics(c, models[name].tasks)
    for name in cols:
        if name == "fp32" or not out["fp32"]:
            continue
        tasks = models[name].tasks
        out[f"auc_change_{name}"] = {t: out[name][t]["auc"] - out["fp32"][t]["auc"] for t in out["fp32"]}
        out[f"max_abs_prob_diff_{name}"] = max(
            float(abs(cols[name][f"p_{t}"] - cols["fp32"][f"p_{t}"]).max()) for t in tasks
        )
    return out


def default_out(run: Path, quantize: str) -> Path:
    """<run>/artifact, or <run>/artifact_int8 for --quantize int8."""
    return run / ("artifact_int8" if quantize == "int8" else "artifact")


def export(
    run: Path,
    out: Path | None = None,
    *,
    checkpoint: Path | None = None,
    quantize: str = "none",
    eval_data: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Write the artifact of `run` into `out`; returns the manifest (also written to out/manifest.json)."""
    if quantize not in ("none", "int8"):
        raise ServingError(f"--quantize {quantize!r}: expected 'none' or 'int8'")
    cfg = load_run_config(run, overrides)
    ckpt = require_complete(checkpoint) if checkpoint is not None else final_checkpoint(run)
    meta = read_meta(ckpt)
    out = out or default_out(run, quantize)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (TABLES_FP32, TABLES_INT8, PROGRAM, PROGRAM_WEIGHTS, MANIFEST, VOCAB_FILE):
        (out / stale).unlink(missing_ok=True)
    fp32 = from_checkpoint(cfg, ckpt)
    (out / "config.toml").write_text(cfg.to_toml())
    if fp32.vocabs:  # the id vocabularies travel with the artifact: predict maps ids as training did
        save_vocabs(out / VOCAB_FILE, fp32.vocabs)
    specs = fp32.sparse.specs
    tables = {s.name: fp32.sparse.ebc.embedding_bags[s.name].weight.detach() for s in specs}  # type: ignore[union-attr, index]
    fp32_bytes = sum(t.numel() * 4 for t in tables.values())
    models = {"fp32": fp32}
    if quantize == "int8":
        quantized = {n: quantize_table(t) for n, t in tables.items()}
        flat = {f"{n}.{part}": t for n, qs in quantized.items() for part, t in zip(("q", "scale_shift"), qs)}
        save_file(flat, str(out / TABLES_INT8))
        table_bytes = sum(t.numel() * t.element_size() for t in flat.values())
        models["int8"] = InferenceModel(cfg, build_sparse(cfg, quantized=quantized), fp32.dense, vocabs=fp32.vocabs)
    else:
        save_file({n: t.contiguous() for n, t in tables.items()}, str(out / TABLES_FP32))
        table_bytes = fp32_bytes
    dense_state = {k: v.contiguous() for k, v in fp32.dense.state_dict().items()}
    save_file(dense_state, str(out / DENSE))
    dense_bytes = sum(t.numel() * t.element_size() for t in dense_state.values())
    program = _export_program(fp32, out)
    data = cfg.data.eval if eval_data is None else eval_data
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "model": cfg.model.name,
        "run": str(run),
        "checkpoint": str(ckpt),
        "step": meta.step,
        "trained_world_size": meta.world_size,
        "trained_ep_size": meta.ep_size,
        "tasks": list(cfg.features.labels),
        "kjt_keys": [f.name for f in cfg.features.sparse],
        "feature_order": feature_order(cfg.features),
        "dense_features": list(cfg.features.dense),
        "vocab": {
            "file": VOCAB_FILE if fp32.vocabs else None,
            "tables": {t: v.summary() for t, v in fp32.vocabs.items()},
            "mapping": "kept id -> oov_buckets + its rank among the sorted kept ids; other ids -> mix64(id) mod "
            "oov_buckets (pipeline.vocab.IdVocab.map)",
        },
        "sparse_dim": sparse_dim(cfg.features),
        "tables": {
            s.name: {"rows": s.num_embeddings, "dim": s.dim, "pooling": s.pooling, "features": s.feature_names}
            for s in specs
        },
        "dtype": "fp32",
        "router": {"moe": cfg.moe.enabled, "eval_router": "infer", "sparse_inference": True},
        "quantization": {
            "tables": quantize if quantize == "int8" else "none",
            "tables_scheme": "FBGEMM fused rowwise int8 (uint8 codes + fp16 scale and bias per row), TorchRec "
            "quant EmbeddingBagCollection"
            if quantize == "int8"
            else "none",
            "dense": "none",
            "dense_note": DENSE_NOT_QUANTIZED,
            "bf16": "runtime option (predict --dtype bf16: dense model under bf16 autocast, meant for GPU); "
            "weights are stored fp32",
        },
        "sizes": {
            "tables_fp32_bytes": fp32_bytes,
            "tables_bytes": table_bytes,
            "tables_saved_bytes": fp32_bytes - table_bytes,
            "tables_saved_pct": 100.0 * (fp32_bytes - table_bytes) / max(fp32_bytes, 1),
            "dense_bytes": dense_bytes,
            "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
        },
        "dense_program": program,
    }
    if data:
        try:
            manifest["eval"] = _eval(models, data)
        except DataError as e:
            manifest["eval"] = {"data": data, "error": str(e)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
