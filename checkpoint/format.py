"""The checkpoint format: names, the meta schema, discovery of complete checkpoints, expert shards.

    <run>/checkpoints/step_00000200/
        sparse/                     tables + fused optimizer state (torch.distributed.checkpoint, resharding on load)
        dense.safetensors           replicated dense weights and buffers (includes the MoE lambda)
        experts_ep<p>.safetensors   expert weights of expert-parallel rank p (metadata: the token positions it holds)
        rank<r>.pt                  dense optimizer state, data-loader position, audit, RNG states of rank r
        meta.json                   written last: a directory without it (or still named *.tmp) is incomplete;
                                    it lists every other file's size and SHA-256, the write sequence
                                    number, the run start (lineage) that wrote it, its parent checkpoint and
                                    the resolved config

Legend: t token positions held by a shard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is intact but does not fit this run (another model, layout or config). Deterministic:
    `training.resume auto` stops on it instead of falling back to an older checkpoint, which would not fit
    either, or would silently throw progress away."""


@dataclass
class CheckpointMeta:
    """meta.json: what wrote the checkpoint (the layout its per-rank files belong to) and how to trust it."""

    step: int
    epoch: int
    world_size: int
    ep_size: int
    model_name: str
    seq: int = 0
    """Write order within the run directory (1, 2, ...): `auto` resumes the highest, whatever its step."""
    lineage: str = ""
    """The run start that wrote it (a new id at every start: fresh, auto-resume or explicit resume)."""
    parent: str | None = None
    """The checkpoint that run start resumed from (None: it started fresh)."""
    files: dict[str, list[Any]] = field(default_factory=dict)
    """{relative path: [size in bytes, SHA-256 hex]} of every file of the checkpoint but meta.json."""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved job config that trained it (what a resume is compared against)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def file_digest(path: Path, chunk: int = 1 << 22) -> list[Any]:
    """[size, SHA-256 hex] of one file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return [size, h.hexdigest()]


def checkpoint_files(path: Path) -> list[str]:
    """Every file under a checkpoint directory except meta.json, as sorted relative paths."""
    return sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name not in (META, META + ".part")
    )


def verify_files(path: Path, meta: CheckpointMeta, names: list[str]) -> list[str]:
    """Problems of the listed files of checkpoint `path` against meta.json (missing, size, SHA-256)."""
    problems = []
    for rel in names:
        want = meta.files.get(rel)
        f = path / rel
        if want is None:
            problems.append(f"{f}: not listed in {META}")
        elif not f.is_file():
            problems.append(f"{f}: missing")
        else:
            size, digest = file_digest(f)
            if size != want[0]:
                problems.append(f"{f}: {size} bytes, {META} says {want[0]} (truncated or appended to)")
            elif digest != want[1]:
                problems.append(f"{f}: SHA-256 differs from {META} (corrupted)")
    return problems


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


def _write_order(path: Path) -> tuple[int, int]:
    """(seq, step) of a checkpoint: its meta's write sequence (step for metas that predate it)."""
    step = int(path.name.split("_")[1])
    try:
        seq = int(json.loads((path / META).read_text()).get("seq", 0))
    except (OSError, ValueError, AttributeError):
        seq = 0
    return (seq or step, step)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step_* checkpoints under `root` (a run's checkpoints/ folder), oldest written first: by
    the write sequence in meta.json, so after a rollback (an explicit resume of an older step) the new
    line's checkpoints count as newer than the abandoned line's higher steps."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if is_complete(p)]
    return sorted(found, key=_write_order)


def next_seq(root: Path) -> int:
    """The write sequence number of the next checkpoint under `root` (the best one included)."""
    paths = [*complete_checkpoints(root), root / BEST_DIR]
    seqs = [0]
    for p in paths:
        try:
            seqs.append(int(json.loads((p / META).read_text()).get("seq", 0)))
        except (OSError, ValueError, AttributeError):
            continue
    return max(seqs) + 1


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
