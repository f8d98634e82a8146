"""World size 2 (with ep_size 1 and 2) against the plain single-process model on the same global batch:
same pooled embeddings, loss, dense and expert gradients, and parameters after one optimizer step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.toml")


def _concat_kjt(parts: list[dict]):
    from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

    keys = parts[0]["keys"]
    jts = {}
    for k in keys:
        values = torch.cat([p["kjt"][k][0] for p in parts])
        lengths = torch.cat([p["kjt"][k][1] for p in parts])
        jts[k] = JaggedTensor(values=values, lengths=lengths)
    return KeyedJaggedTensor.from_jt_dict(jts)


def _vs_reference(data: str, out: str, ep: int) -> dict[str, float]:
    from deepspeed.moe.utils import is_moe_param

    from config import load_config
    from config.job import dense_input_spec
    from embeddings.regroup import pooled_to_model_input, sparse_dim
    from embeddings.tables import build_sparse_arch
    from model.dense_input import dense_inputs
    from model.moe import moe_layers
    from model.output import task_loss
    from model.zoo import build_model
    from parallel.dense_engine import build_optimizer, set_dense_lr
    from parallel.distributed import init_distributed
    from train.trainer import Trainer

    argv = ["--config", CONFIG, "--data.train", f"{data}/train", "--data.eval", f"{data}/eval"]
    argv += ["--training.output_dir", out, "--parallelism.ep_size", str(ep), "--moe.l1_init", "0.01"]
    cfg = load_config(argv, world_size=2)
    tr = Trainer(cfg, init_distributed())
    batch = next(iter(tr.loader))
    local = {
        "keys": batch.sparse.keys(),
        "kjt": {k: (jt.values(), jt.lengths()) for k, jt in batch.sparse.to_dict().items()},
        "dense": batch.dense,
        "labels": batch.labels,
        "weights": batch.weights,
    }
    parts: list = [None, None]
    dist.all_gather_object(parts, local)
    rank, B = dist.get_rank(), batch.size
    rows = slice(rank * B, (rank + 1) * B)

    # --- the plain single-process model on the global batch of 2 x B rows
    f, t = cfg.features, cfg.training
    ref_sparse = build_sparse_arch(f, cfg.embeddings, device=torch.device("cpu"), seed=t.seed)
    ref_BI = pooled_to_model_input(ref_sparse(_concat_kjt(parts)), f).detach()
    ref = build_model(cfg.model, cfg.moe, sparse_dim=sparse_dim(f), dense=dense_input_spec(f), num_tasks=2, seed=t.seed)
    # the trainer wrote the training statistics into its dense input's buffers: the reference uses the same
    for mine, theirs in zip(dense_inputs(ref), dense_inputs(tr.model), strict=True):
        mine.load_state_dict(theirs.state_dict())
    dense = torch.cat([p["dense"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    weights = torch.cat([p["weights"] for p in parts])
    ref_out = ref(ref_BI, dense)
    ref_loss = task_loss(ref_out.logits_BK, labels, weights)[0] + ref_out.reg_loss
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    # --- the trainer's step (train.step.TrainStep), phase by phase
    factor = tr.step_fn.set_lr(0)
    sparse_BI = tr.step_fn.embed(batch)
    out = tr.step_fn.dense(sparse_BI, batch.dense)
    loss = tr.step_fn.loss(out, batch, sparse_BI)[0]
    tr.engine.backward(loss)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    errs = {
        "pooled": float((sparse_BI.detach() - ref_BI[rows]).abs().max()),
        "logits": float((out.logits_BK.detach() - ref_out.logits_BK.detach()[rows]).abs().max()),
        "loss": float((mean_loss / 2 - ref_loss.detach()).abs()),
    }
    positions = {i: list(getattr(m.experts, "local", m.experts).positions) for i, m in enumerate(moe_layers(tr.model))}

    def ref_name(name: str) -> tuple[str, slice]:
        if ".experts.local." in name:
            layer = next(i for i, m in enumerate(moe_layers(tr.model)) if name.startswith(_prefix(tr.model, m)))
            pos = positions[layer]
            return name.replace(".experts.local.", ".experts."), slice(pos[0], pos[-1] + 1)
        return name, slice(None)

    grad_err, n_expert = 0.0, 0
    for name, p in tr.model.named_parameters():
        rn, sl = ref_name(name)
        grad_err = max(grad_err, float((p.grad - ref_grads[rn][sl]).abs().max()))
        n_expert += int(is_moe_param(p))
    errs["grads"] = grad_err
    errs["expert_params_seen"] = n_expert

    tr.step_fn.update()
    ref_opt = build_optimizer(ref, cfg)
    set_dense_lr(ref_opt, t.lr * factor)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), t.grad_clip)
    ref_opt.step()
    ref_params = dict(ref.named_parameters())
    param_err = 0.0
    for name, p in tr.model.named_parameters():
        rn, sl = ref_name(name)
        param_err = max(param_err, float((p.detach() - ref_params[rn].detach()[sl]).abs().max()))
    errs["params_after_step"] = param_err
    # engine.backward reached the tables: their fused optimizer already updated the looked-up rows
    kt = tr.dmp(batch.sparse)
    after_BI = pooled_to_model_input(kt.wait() if hasattr(kt, "wait") else kt, f)
    errs["tables_moved"] = float((after_BI - sparse_BI.detach()).abs().max())
    return errs


def _prefix(model: torch.nn.Module, layer: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is layer) + "."


@pytest.mark.parametrize("ep", [1, 2])
def test_two_ranks_match_single_process_model(dist_pool, tiny_data, tmp_path, ep: int) -> None:
    for errs in dist_pool.run(_vs_reference, tiny_data, str(tmp_path / f"ep{ep}"), ep):
        assert errs["expert_params_seen"] > 0
        assert errs["tables_moved"] > 1e-6, "the embedding tables did not change after backward"
        for key in ("pooled", "logits", "loss", "grads", "params_after_step"):
            assert errs[key] < 2e-5, f"ep_size={ep}: {key} differs by {errs[key]}"
