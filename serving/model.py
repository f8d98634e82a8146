"""The inference model shared by `launch.evaluate`, `launch.export`, `launch.predict` and `bench.serve`.

    run dir --checkpoints/best, else the latest complete step_*--> tables (DCP, no process group) + weights
        (dense.safetensors + every experts_ep<p>.safetensors merged by token position)
    --> InferenceModel = SparseArch (unsharded tables; fp32, or TorchRec's INT8 quantized EBC)
                         + the zoo model in eval mode with the sparse-inference router
                           (PerTokenMoE.sparse_inference = True: zero-gate experts are not computed)
    forward(kjt, dense_BF) -> probs_BK

Nothing here needs a process group, DeepSpeed or the trainer: a fresh process loads an artifact with
model/, embeddings/ and pipeline/ only. Every load is safetensors or JSON; a *training checkpoint's*
sparse/ directory is read through DCP with its `.metadata` unpickled by a restricted unpickler that only
builds DCP's metadata classes (`checkpoint.safe_dcp`, the same read the trainer's resume does).

Legend: B batch, I pooled-embedding width, F dense features, K tasks, R table rows, C table width.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from checkpoint.format import CheckpointError, read_expert_shards
from checkpoint.safe_dcp import SafeFileSystemReader, dcp_error
from config import ConfigError, JobConfig, load_config
from config.job import dense_input_spec
from embeddings.regroup import pooled_to_model_input, sparse_dim, sparse_group_widths
from embeddings.tables import SparseArch, TableSpec, build_sparse_arch, table_specs
from model.moe import moe_layers
from model.zoo import build_model
from pipeline.batch import Batch
from pipeline.errors import DataError
from pipeline.vocab import VOCAB_FILE, IdVocab, check_sizes, load_vocabs, vocab_tables

CONFIG_FILE = "config.toml"
SERVING_PINS = {"parallelism.ep_size": 1, "training.resume": "never"}
"""What serving fixes in a run's config: experts are loaded whole (merged from every expert-parallel
shard), and nothing resumes; the file's values only described how training ran."""


class ServingError(RuntimeError):
    """A run, checkpoint or artifact is missing or unusable; the message names the path."""


# ----------------------------------------------------------------------------------------- runs


def load_run_config(path: Path, overrides: list[str] | None = None) -> JobConfig:
    """The resolved config saved in a run directory (or an artifact), with `--section.field value` overrides.

    `SERVING_PINS` are applied: experts are loaded whole, so `parallelism.ep_size` is 1 whatever
    training used, and `training.resume` is 'never'.

    Raises:
        ServingError: the directory or its config.toml is missing, or the config is invalid.
    """
    if not path.is_dir():
        raise ServingError(f"{path}: no such run directory")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ServingError(f"{file}: missing (is {path} a run directory written by launch.train?)")
    try:
        return load_config(["--config", str(file), *(overrides or [])], world_size=1, pin=SERVING_PINS)
    except ConfigError as e:
        raise ServingError(f"{file}: {e}") from None


def _supported(cfg: JobConfig) -> None:
    if cfg.embeddings.managed_collision:
        raise ServingError(
            f"embeddings.managed_collision = {cfg.embeddings.managed_collision}: serving these tables is not supported "
            "(their id remappers are saved per row-wise shard and cannot be merged into one unsharded table)"
        )


def read_tables(ckpt: Path, specs: list[TableSpec]) -> dict[str, Tensor]:
    """Full (unsharded) fp32 tables {table: R x C} from the checkpoint's DCP directory, in this process only.

    DCP reshards on load: whatever plan and world size wrote the shards, each table is read into one
    plain tensor. No process group is used (`no_dist=True`), so every rank of a job may call it.
    """
    sparse = ckpt / "sparse"
    if not (sparse / ".metadata").is_file():
        raise ServingError(f"{sparse}: no DCP .metadata (not a sparse checkpoint)")
    state = {f"model.ebc.embedding_bags.{s.name}.weight": torch.empty(s.num_embeddings, s.dim) for s in specs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process": it is
        try:  # metadata through the restricted unpickler: a crafted .metadata cannot run code
            dcp.load(state, storage_reader=SafeFileSystemReader(str(sparse)), no_dist=True)
        except CheckpointError:
            raise
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            raise dcp_error(str(sparse), e) from None
    return {s.name: state[f"model.ebc.embedding_bags.{s.name}.weight"] for s in specs}


def read_dense_state(ckpt: Path, model: nn.Module) -> dict[str, Tensor]:
    """Dense weights for an unsharded `model`: dense.safetensors plus every experts_ep<p> shard merged.

    Each shard holds the experts of some token positions (its `positions` metadata); stacking them by
    position gives the full `T x E x ...` expert tensors whatever ep_size wrote them.

    Returns:
        {key of model.state_dict(): tensor}, every key of the model present.
    """
    dense_file = ckpt / "dense.safetensors"
    if not dense_file.is_file():
        raise ServingError(f"{dense_file}: missing")
    state = load_file(str(dense_file))
    layers = moe_layers(model)
    if layers:
        prefix = {id(m): n for n, m in model.named_modules()}
        wanted = [(list(range(layer.num_tokens)), [n for n, _ in layer.experts.named_parameters()]) for layer in layers]
        shards = read_expert_shards(ckpt, wanted)
        for layer, tensors in zip(layers, shards):
            for name, t in tensors.items():
                state[f"{prefix[id(layer)]}.experts.{name}"] = t
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ServingError(
            f"{dense_file}: weights do not fit the config's model (missing {missing[:3]}, extra {unexpected[:3]})"
        )
    return state


# ----------------------------------------------------------------------------------------- model


def build_dense(cfg: JobConfig) -> nn.Module:
    """The zoo model of `cfg` with full (unsharded) experts, in eval mode, sparse-inference router on."""
    f = cfg.features
    model = build_model(
        cfg.model,
        cfg.moe,
        sparse_dim=sparse_dim(f),
        dense=dense_input_spec(f),
        num_tasks=len(f.labels),
        seed=0,
        sparse_groups=sparse_group_widths(f),
    )
    set_sparse_inference(model, True)
    return model.eval().requires_grad_(False)


def set_sparse_inference(model: nn.Module, on: bool) -> None:
    """Route with the inference router and skip zero-gate experts (`on`) or run them densely weighted."""
    for layer in moe_layers(model):
        layer.sparse_inference = on
        layer.eval_router = "infer"


def quantize_table(weight_RC: Tensor) -> tuple[Tensor, Tensor]:
    """FBGEMM's fused 8-bit rowwise quantization of one table (what TorchRec's quant EBC stores).

    Returns:
        (q_RC uint8, scale_shift_R4 uint8: an fp16 scale and an fp16 bias per row).
    """
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(weight_RC.float().contiguous(), 8)
    return fused[:, :-4].contiguous(), fused[:, -4:].contiguous()


def int8_tables(
    specs: list[TableSpec], quantized: dict[str, tuple[Tensor, Tensor]], device: torch.device
) -> QuantEmbeddingBagCollection:
    """TorchRec's quantized inference EBC over pre-quantized rows: FBGEMM's int8 TBE kernels on `device`
    (built in place: `.to()` does not move the kernel's weights). Verified on CPU with fbgemm-gpu-cpu 1.8.0."""
    configs = []
    for s in specs:
        c: EmbeddingBagConfig = s.config()
        c.data_type = DataType.INT8
        configs.append(c)
    on_device = {n: (q.to(device), ss.to(device)) for n, (q, ss) in quantized.items()}
    return QuantEmbeddingBagCollection(
        configs, is_weighted=False, device=device, table_name_to_quantized_weights=on_device
    )


def build_sparse(
    cfg: JobConfig,
    tables: dict[str, Tensor] | None = None,
    quantized: dict[str, tuple[Tensor, Tensor]] | None = None,
    device: torch.device | None = None,
) -> SparseArch:
    """The unsharded sparse arch over fp32 `tables` {name: R x C} or int8 `quantized` {name: (q, scale_shift)}
    (int8 tables are built on `device`, default CPU; move fp32 ones with `.to`)."""
    _supported(cfg)
    arch = build_sparse_arch(cfg.features, cfg.embeddings, device=torch.device("meta"))
    specs = arch.specs
    if quantized is not None:
        arch.ebc = int8_tables(specs, quantized, device or torch.device("cpu"))  # type: ignore[assignment]
        return arch.eval()
    if tables is None:
        raise ValueError("build_sparse: pass `tables` (fp32) or `quantized` (int8)")
    state = {f"ebc.embedding_bags.{s.name}.weight": tables[s.name] for s in specs}
    arch.load_state_dict(state, assign=True)
    return arch.eval().requires_grad_(False)


class InferenceModel(nn.Module):
    """Embeddings + dense model: a KJT batch and its dense features -> probabilities.

    Args:
        cfg: the resolved job config (features and model sections).
        sparse: the unsharded sparse arch (`build_sparse`).
        dense: the zoo model (`build_dense`), weights loaded.
        dtype: "fp32", or "bf16" (the dense model under bf16 autocast, as training's bf16 path; meant for GPU).
        vocabs: the id vocabularies of the run (`load_run_vocabs`), {} without 'vocab' features.

    Example:
        model = load_artifact(Path("artifacts/tiny"))[0]
        probs_BK = model(batch.sparse, batch.dense)
    """

    def __init__(
        self,
        cfg: JobConfig,
        sparse: SparseArch,
        dense: nn.Module,
        dtype: str = "fp32",
        vocabs: dict[str, IdVocab] | None = None,
    ) -> None:
        super().__init__()
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"InferenceModel: dtype must be 'fp32' or 'bf16', got {dtype!r}")
        self.cfg, self.sparse, self.dense, self.dtype = cfg, sparse, dense, dtype
        self.tasks = list(cfg.features.labels)
        self.vocabs = vocabs or {}
        """The run's id vocabularies by table ('vocab' features): readers of this model's input map raw
        ids through them (`ParquetLoader(..., vocabs=model.vocabs)`), exactly as training did."""

    def embed(self, kjt: KeyedJaggedTensor) -> Tensor:
        """kjt (keys = features.sparse names) -> sparse_BI pooled embeddings in model order."""
        return pooled_to_model_input(self.sparse(kjt), self.cfg.features)

    def score_dense(self, sparse_BI: Tensor, dense_BF: Tensor) -> Tensor:
        """sparse_BI: B x I, dense_BF: B x F -> probs_BK: B x K (float32)."""
        device = sparse_BI.device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
            logits_BK = self.dense(sparse_BI, dense_BF).logits_BK
        return torch.sigmoid(logits_BK.float())

    @torch.no_grad()
    def forward(self, kjt: KeyedJaggedTensor, dense_BF: Tensor) -> Tensor:
        """kjt: B samples of every sparse feature, dense_BF: B x F -> probs_BK: B x K."""
        return self.score_dense(self.embed(kjt), dense_BF)


def from_checkpoint(cfg: JobConfig, ckpt: Path, *, quantize: str = "none", dtype: str = "fp32") -> InferenceModel:
    """The inference model of a checkpoint (tables read without a process group, experts merged)."""
    _supported(cfg)
    specs = table_specs(cfg.features, cfg.embeddings)
    tables = read_tables(ckpt, specs)
    dense = build_dense(cfg)
    dense.load_state_dict(read_dense_state(ckpt, dense))
    if quantize == "int8":
        sparse = build_sparse(cfg, quantized={n: quantize_table(t) for n, t in tables.items()})
    else:
        sparse = build_sparse(cfg, tables=tables)
    return InferenceModel(cfg, sparse, dense, dtype, load_run_vocabs(cfg, ckpt))


def load_run_vocabs(cfg: JobConfig, where: Path) -> dict[str, IdVocab]:
    """The id vocabularies a checkpoint or artifact directory carries ({} without 'vocab' features), checked
    against the config's table sizes (ServingError naming the file when missing, corrupt or too large)."""
    if not vocab_tables(cfg.features):
        return {}
    try:
        vocabs = load_vocabs(where / VOCAB_FILE, cfg.features)
        check_sizes(cfg.features, vocabs, str(where / VOCAB_FILE))
    except DataError as e:
        raise ServingError(str(e)) from None
    return vocabs


def iter_scores(
    model: InferenceModel, batches: Iterator[Batch], device: torch.device
) -> Iterator[tuple[Tensor, Batch]]:
    """(probs_BK on CPU, batch) per batch, weight-0 padding rows removed from both."""
    for batch in batches:
        keep = batch.weights > 0
        probs = model(batch.sparse.to(device), batch.dense.to(device)).cpu()
        if not bool(keep.all()):
            probs = probs[keep]
            batch = Batch(
                sparse=batch.sparse,  # the KJT is not used after scoring
                dense=batch.dense[keep],
                labels=batch.labels[keep],
                weights=batch.weights[keep],
                user_ids=batch.user_ids[keep],
                row_ids=batch.row_ids[keep],
            )
        yield probs, batch


# ----------------------------------------------------------------------------------------- artifacts

MANIFEST = "manifest.json"
TABLES_FP32 = "tables.safetensors"
TABLES_INT8 = "tables_int8.safetensors"
DENSE = "dense.safetensors"
PROGRAM = "dense_program.json"
PROGRAM_WEIGHTS = "dense_program.safetensors"


class DenseScorer(nn.Module):
    """The dense path as one module for torch.export: (sparse_BI, dense_BF) -> probs_BK."""

    def __init__(self, dense: nn.Module) -> None:
        super().__init__()
        self.dense = dense

    def forward(self, sparse_BI: Tensor, dense_BF: Tensor) -> Tensor:
        """sparse_BI: B x I pooled embeddings (model order), dense_BF: B x F -> probs_BK: B x K."""
        return torch.sigmoid(self.dense(sparse_BI, dense_BF).logits_BK)


def read_manifest(artifact: Path) -> dict:
    """The artifact's manifest.json (ServingError naming the path when missing or unreadable)."""
    if not artifact.is_dir():
        raise ServingError(f"{artifact}: no such artifact directory")
    file = artifact / MANIFEST
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ServingError(f"{file}: unreadable artifact manifest ({e})") from None


def load_artifact(
    artifact: Path, dtype: str = "fp32", device: torch.device | None = None
) -> tuple[InferenceModel, dict]:
    """Load an artifact written by `launch.export` in a fresh process: safetensors + JSON + TOML only.

    Args:
        artifact: the artifact directory.
        dtype: "fp32", or "bf16" to run the dense model under bf16 autocast (GPU).
        device: where to run (default CPU); int8 tables run FBGEMM's kernels there (CUDA: untested here).

    Returns:
        (model, manifest).
    """
    manifest = read_manifest(artifact)
    cfg = load_run_config(artifact)
    file = artifact / (TABLES_INT8 if manifest["quantization"]["tables"] == "int8" else TABLES_FP32)
    if not file.is_file():
        raise ServingError(f"{file}: missing (the manifest says tables are {manifest['quantization']['tables']})")
    raw = load_file(str(file))
    if manifest["quantization"]["tables"] == "int8":
        names = {k.rsplit(".", 1)[0] for k in raw}
        sparse = build_sparse(
            cfg, quantized={n: (raw[f"{n}.q"], raw[f"{n}.scale_shift"]) for n in names}, device=device
        )
    else:
        sparse = build_sparse(cfg, tables=raw)
    dense = build_dense(cfg)
    if not (artifact / DENSE).is_file():
        raise ServingError(f"{artifact / DENSE}: missing")
    dense.load_state_dict(load_file(str(artifact / DENSE)))
    model = InferenceModel(cfg, sparse, dense, dtype, load_run_vocabs(cfg, artifact))
    return (model.to(device) if device is not None else model), manifest


def load_program(artifact: Path) -> torch.export.ExportedProgram:
    """The dense-path program written by `save_program` (JSON + safetensors, no pickle)."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass

    files = (artifact / PROGRAM, artifact / PROGRAM_WEIGHTS)
    for f in files:
        if not f.is_file():
            raise ServingError(f"{f}: missing (export writes it when the dense path traces)")
    program = _bytes_to_dataclass(schema.ExportedProgram, files[0].read_bytes())
    with safe_open(str(files[1]), framework="pt") as h:
        params = set(json.loads(h.metadata()["parameters"]))
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    state: dict[str, Tensor] = {}
    for k, v in tensors.items():
        if k.startswith("state/"):
            name = k[len("state/") :]
            state[name] = nn.Parameter(v, requires_grad=False) if name in params else v
    constants = {k[len("const/") :]: v for k, v in tensors.items() if k.startswith("const/")}
    return ExportedProgramDeserializer().deserialize(program, state, constants, None)
