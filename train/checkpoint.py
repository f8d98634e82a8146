"""The checkpoint layout, written atomically and pruned:

    <run>/checkpoints/step_00000200/
        sparse/                     tables + fused optimizer state (DCP, resharding on load)
        dense.safetensors           replicated dense weights and buffers (rank 0; includes MoE lambda)
        experts_ep<p>.safetensors   expert weights of expert-parallel rank p (one file per shard)
        rank<r>.pt                  dense optimizer state, data-loader position, audit, RNG states
        meta.json                   written last; a directory without it (or still named *.tmp) is ignored

Every file is written into `step_N.tmp/`; after a barrier rank 0 writes meta.json and renames the
directory into place, so a crash mid-save leaves the previous checkpoint as the latest. Loads use
safetensors, DCP and `torch.load(weights_only=True)`: never arbitrary pickle.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from embeddings import load_sparse, save_sparse
from model.moe import moe_layers
from parallel.distributed import barrier

META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or incompatible; the message says which and why."""


@dataclass
class CheckpointMeta:
    step: int
    epoch: int
    world_size: int
    ep_size: int
    model_name: str


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resolve_resume(resume: str, root: Path) -> Path | None:
    """'auto' -> latest complete checkpoint or None; 'never' -> None; else a checkpoint path that must exist."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / META).is_file():
        raise CheckpointError(
            f"training.resume: {path} is not a complete checkpoint (no {META}); "
            f"complete ones under {root}: {[p.name for p in complete_checkpoints(root)] or 'none'}"
        )
    return path


def _expert_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    tensors: dict[str, torch.Tensor] = {}
    positions: list[list[int]] = []
    for i, layer in enumerate(moe_layers(model)):
        local = getattr(layer.experts, "local", layer.experts)
        positions.append(list(local.positions))
        for name, p in local.named_parameters():
            tensors[f"layer{i}.{name}"] = p.detach().cpu().contiguous()
    return tensors, positions


def _dense_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    expert_ids = {id(p) for p in model.parameters() if is_moe_param(p)}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in expert_ids:
            continue
        out[name] = t.detach().cpu().contiguous()
    return out


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), *npst[2:]))
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))


def save_checkpoint(
    root: Path,
    *,
    step: int,
    epoch: int,
    dmp: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    ep_size: int,
    ep_rank: int,
    expert_dp_rank: int,
    model_name: str,
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    save_sparse(dmp, str(tmp / "sparse"))
    if rank == 0:
        save_file(_dense_tensors(model), str(tmp / "dense.safetensors"))
    experts, positions = _expert_tensors(model)
    if experts and expert_dp_rank == 0:
        save_file(experts, str(tmp / f"experts_ep{ep_rank}.safetensors"), metadata={"positions": json.dumps(positions)})
    torch.save(
        {"optimizer": optimizer.state_dict(), "rng": _rng_state(), "trainer": trainer_state},
        tmp / f"rank{rank}.pt",
    )
    barrier()
    if rank == 0:
        meta = CheckpointMeta(step, epoch, world, ep_size, model_name)
        (tmp / (META + ".part")).write_text(json.dumps(meta.__dict__, indent=2) + "\n")
        (tmp / (META + ".part")).rename(tmp / META)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_meta(path: Path) -> CheckpointMeta:
    try:
        return CheckpointMeta(**json.loads((path / META).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / META}: unreadable checkpoint metadata ({e})") from None


def load_checkpoint(
    path: Path,
    *,
    dmp: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ep_size: int,
    model_name: str,
) -> tuple[CheckpointMeta, dict[str, Any]]:
    """Collective. Restores tables, dense and expert weights, optimizer and RNG; returns (meta, trainer_state).

    Weights load on any world size and ep_size (DCP reshards the tables; experts are re-sliced by token
    position). The dense optimizer state is per expert-parallel layout: it loads when ep_size and the
    world size match the checkpoint, or when both sides use ep_size 1 (replicated state).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    meta = read_meta(path)
    if meta.model_name != model_name:
        raise CheckpointError(f"{path}: written for model.name={meta.model_name!r}, this run has {model_name!r}")
    same_layout = meta.world_size == world and meta.ep_size == ep_size
    if not same_layout and not (meta.ep_size == 1 and ep_size == 1):
        raise CheckpointError(
            f"{path}: written with world_size={meta.world_size}, ep_size={meta.ep_size}; this run has "
            f"world_size={world}, ep_size={ep_size}. The dense optimizer state of sharded experts only resumes "
            "on the same layout (supported: the same world_size and ep_size, or ep_size=1 on both sides with any "
            "world size)"
        )
    load_sparse(dmp, str(path / "sparse"))
    dense = load_file(str(path / "dense.safetensors"))
    missing, unexpected = _load_dense(model, dense)
    if unexpected:
        raise CheckpointError(f"{path}/dense.safetensors: unexpected tensors {unexpected[:5]}")
    _load_experts(model, path)
    state_file = path / f"rank{rank if same_layout else 0}.pt"
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    if not same_layout:
        state["trainer"]["loader"] = None  # positions are per rank: the trainer checks and explains
    return meta, state["trainer"]


def _load_dense(model: nn.Module, dense: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = model.state_dict(keep_vars=True)
    expert_ids = {id(p) for p in model.parameters() if is_moe_param(p)}
    unexpected = [k for k in dense if k not in own]
    missing = [k for k, v in own.items() if k not in dense and id(v) not in expert_ids]
    if missing:
        raise CheckpointError(f"dense.safetensors lacks {missing[:5]} (model config changed since the checkpoint?)")
    with torch.no_grad():
        for k, v in dense.items():
            if k in own:
                own[k].copy_(v)
    return missing, unexpected


def read_expert_shards(path: Path, wanted: list[tuple[list[int], list[str]]]) -> list[dict[str, torch.Tensor]]:
    """Expert weights gathered from every `experts_ep<p>.safetensors` shard, whatever ep_size wrote them.

    Args:
        path: a checkpoint directory.
        wanted: per MoE layer, (token positions, parameter names) to return.

    Returns:
        per layer, {name: tensor stacked over the wanted positions (len(positions) x ...)}.
    """
    files = sorted(path.glob("experts_ep*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no experts_ep*.safetensors although the model has MoE layers")
    by_pos: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            positions = json.loads(h.metadata()["positions"])
            for key in h.keys():
                layer_s, name = key.split(".", 1)
                i = int(layer_s[len("layer") :])
                t = h.get_tensor(key)
                for j, pos in enumerate(positions[i]):
                    by_pos.setdefault((i, name), {})[pos] = t[j]
    out: list[dict[str, torch.Tensor]] = []
    for i, (positions, names) in enumerate(wanted):
        layer: dict[str, torch.Tensor] = {}
        for name in names:
            have = by_pos.get((i, name), {})
            lacking = [pos for pos in positions if pos not in have]
            if lacking:
                raise CheckpointError(f"{path}: expert shards lack layer {i} '{name}' positions {lacking}")
            layer[name] = torch.stack([have[pos] for pos in positions])
        out.append(layer)
    return out


def _load_experts(model: nn.Module, path: Path) -> None:
    locals_ = [getattr(layer.experts, "local", layer.experts) for layer in moe_layers(model)]
    if not locals_:
        return
    wanted = [(list(m.positions), [n for n, _ in m.named_parameters()]) for m in locals_]
    with torch.no_grad():
        for local, tensors in zip(locals_, read_expert_shards(path, wanted)):
            for name, p in local.named_parameters():
                p.copy_(tensors[name])
