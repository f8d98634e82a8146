"""The checkpoint format: names, the meta schema, discovery of complete checkpoints, expert shards.

    <run>/checkpoints/step_00000200/
        sparse/                     tables + fused optimizer state (torch.distributed.checkpoint, resharding on load)
        dense.safetensors           replicated dense weights and buffers (includes the MoE lambda)
        experts_ep<p>.safetensors   expert weights of expert-parallel rank p (metadata: the token positions it holds)
        rank<r>.pt                  dense optimizer state, data-loader position, audit, RNG states of rank r
        meta.json                   written last: a directory without it (or still named *.tmp) is incomplete

Legend: t token positions held by a shard.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

META = "meta.json"
SPARSE_DIR = "sparse"
DENSE_FILE = "dense.safetensors"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
"""checkpoints/best: the best validation evaluation's checkpoint, kept apart from keep_last pruning."""
TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or incompatible; the message says which and why."""


@dataclass
class CheckpointMeta:
    """meta.json: what wrote the checkpoint (the layout its per-rank files belong to)."""

    step: int
    epoch: int
    world_size: int
    ep_size: int
    model_name: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def step_dir_name(step: int) -> str:
    """`step_00000200`: names sort in step order."""
    return f"step_{step:08d}"


def experts_file(ep_rank: int) -> str:
    """The expert shard of expert-parallel rank `ep_rank`."""
    return f"experts_ep{ep_rank}.safetensors"


def rank_state_file(rank: int) -> str:
    """Per-rank trainer state (optimizer, loader position, RNG)."""
    return f"rank{rank}.pt"


def is_complete(path: Path) -> bool:
    """A step directory that was renamed into place and has its meta.json."""
    return path.is_dir() and not path.name.endswith(TMP_SUFFIX) and (path / META).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (a run's checkpoints/ folder), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def read_meta(path: Path) -> CheckpointMeta:
    """meta.json of checkpoint `path` (CheckpointError naming the file when unreadable)."""
    try:
        return CheckpointMeta(**json.loads((path / META).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / META}: unreadable checkpoint metadata ({e})") from None


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
                t_tX = h.get_tensor(key)
                for j, pos in enumerate(positions[i]):
                    by_pos.setdefault((i, name), {})[pos] = t_tX[j]
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


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run directory (CheckpointError naming the folder if none)."""
    root = run_dir / CHECKPOINTS_DIR
    found = complete_checkpoints(root)
    if not found:
        raise CheckpointError(f"{root}: no complete checkpoint (a step_* folder with {META})")
    return found[-1]


def final_checkpoint(run_dir: Path) -> Path:
    """The weights a run ends with: checkpoints/best when it kept one (validation with
    training.restore_best), else its newest complete step_* (CheckpointError naming the folder if none)."""
    best = run_dir / CHECKPOINTS_DIR / BEST_DIR
    return best if is_complete(best) else latest_checkpoint(run_dir)


def require_complete(path: Path) -> Path:
    """`path` if it is a complete checkpoint, else CheckpointError naming it."""
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {META})")
    return path
