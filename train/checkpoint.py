"""Saving and resuming the trainer's checkpoints (the format itself: `checkpoint.format`).

    ckpt = CheckpointManager(run_dir / "checkpoints", parts, keep_last=2)
    path = ckpt.save(step, epoch, trainer_state)        # collective
    meta, trainer_state = ckpt.load(ckpt.resolve("auto"))

Every file is written into `step_N.tmp/`; after a barrier rank 0 writes meta.json and renames the
directory into place, so a crash mid-save leaves the previous checkpoint as the latest. Loads use
safetensors, DCP and `torch.load(weights_only=True)`: never arbitrary pickle. Expert shards are named
by the expert-parallel rank of `ParallelLayout`, read from DeepSpeed's groups.
"""

from __future__ import annotations

import json
import random
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from checkpoint.format import (
    DENSE_FILE,
    META,
    SPARSE_DIR,
    TMP_SUFFIX,
    CheckpointError,
    CheckpointMeta,
    CheckpointMismatchError,
    checkpoint_files,
    complete_checkpoints,
    experts_file,
    file_digest,
    next_seq,
    rank_state_file,
    read_expert_shards,
    read_meta,
    step_dir_name,
    verify_files,
)
from embeddings.checkpoint import load_sparse, save_sparse
from model.moe import moe_layers
from parallel.distributed import all_gather_object, barrier, broadcast_object
from parallel.layout import ParallelLayout
from train.ema import WeightEMA


@dataclass
class CheckpointParts:
    """What a checkpoint holds, besides the trainer's own state dict.

    Attributes:
        dmp: the sharded tables (DistributedModelParallel) with their fused optimizer.
        model: the dense model (experts hold this rank's shard).
        optimizer: the dense optimizer.
        layout: this rank's place (world, expert-parallel and expert-data-parallel ranks).
        model_name: `model.name`, checked on load.
        files: run-level files every checkpoint carries a copy of (e.g. vocab.npz).
    """

    dmp: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    layout: ParallelLayout
    model_name: str
    files: dict[str, Path] = field(default_factory=dict)
    """Run-level files copied into every checkpoint under these names (the id vocabularies), listed and
    verified like the rest."""
    ema: WeightEMA | None = None
    """The average of the dense weights (`training.ema_decay`): checkpoints store the averaged weights as the
    model's and the training weights in each rank's state file."""


def resolve_resume(resume: str, root: Path) -> Path | None:
    """'auto' -> the latest written complete checkpoint or None; 'never' -> None; else a checkpoint path that
    must exist. (`resume_candidates` gives the fallbacks of 'auto' too.)"""
    found = resume_candidates(resume, root)
    return found[0] if found else None


def resume_candidates(resume: str, root: Path) -> list[Path]:
    """What to try, in order: 'auto' -> every complete step_* checkpoint, newest written first (a corrupt one
    falls back to the one before); 'never' -> none; a path -> that one only (it must be complete)."""
    if resume == "never":
        return []
    if resume == "auto":
        return complete_checkpoints(root)[::-1]
    path = Path(resume)
    if not (path / META).is_file():
        raise CheckpointError(
            f"training.resume: {path} is not a complete checkpoint (no {META}); "
            f"complete ones under {root}: {[p.name for p in complete_checkpoints(root)] or 'none'}"
        )
    return [path]


def _expert_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    tensors: dict[str, torch.Tensor] = {}
    positions: list[list[int]] = []
    for i, layer in enumerate(moe_layers(model)):
        local = getattr(layer.experts, "local", layer.experts)
        positions.append(list(local.positions))
        for name, p in local.named_parameters():
            tensors[f"layer{i}.{name}"] = p.detach().cpu().contiguous()
    return tensors, positions


def _expert_ids(model: nn.Module) -> set[int]:
    """ids of the expert parameters (they go to the expert shards, not dense.safetensors)."""
    return {id(p) for layer in moe_layers(model) for p in layer.experts.parameters()}


def _dense_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    expert_ids = _expert_ids(model)
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in expert_ids:
            continue
        out[name] = t.detach().cpu().contiguous()
    return out


def _rng_state() -> dict[str, Any]:
    """This rank's RNG states: torch (CPU), this rank's CUDA device when CUDA is in use, numpy, Python."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: this rank's (set by init_distributed)
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), *npst[2:]))
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))


class CheckpointManager:
    """Save, prune, find and load the checkpoints of one run (every method but `resolve` is collective).

    Args:
        root: the run's checkpoints/ folder.
        parts: the tables, dense model, optimizer and layout the checkpoints hold.
        keep_last: complete checkpoints kept; older ones are pruned after each save.
    """

    def __init__(
        self, root: Path, parts: CheckpointParts, keep_last: int, config: dict[str, Any] | None = None
    ) -> None:
        self.root, self.parts, self.keep_last = root, parts, keep_last
        self.ema = parts.ema or WeightEMA(parts.model, 0.0)
        """The dense weights' average (an "off" one without parts.ema): saves swap it in, loads put it back."""
        self.config = config or {}
        self.lineage = str(broadcast_object(uuid.uuid4().hex[:12]))  # this run start: every rank the same id
        self.parent: Path | None = None
        """The checkpoint this run start resumed from: recorded in every checkpoint it writes, never pruned."""

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint `training.resume` asks for: 'auto' (latest written, or None), 'never' (None), or a path."""
        return resolve_resume(resume, self.root)

    def candidates(self, resume: str) -> list[Path]:
        """The checkpoints to try for `training.resume`, in order (see `resume_candidates`)."""
        return resume_candidates(resume, self.root)

    def verify(self, path: Path) -> CheckpointMeta:
        """Check every file of checkpoint `path` against meta.json (size and SHA-256), each rank a share of
        the files; the same CheckpointError (one line) on every rank when any fails. Collective."""
        meta = read_meta(path)
        lay = self.parts.layout
        if not meta.files:
            return meta  # written before checkpoints listed their files: nothing to check against
        listed = sorted(set(checkpoint_files(path)) | set(meta.files))
        problems = verify_files(path, meta, listed[lay.rank :: lay.world_size])
        found = [q for rank_problems in all_gather_object(problems) for q in rank_problems]  # type: ignore[union-attr]
        if found:
            more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
            raise CheckpointError(f"{found[0]}{more}")
        return meta

    def save(self, step: int, epoch: int, trainer_state: dict[str, Any], name: str | None = None) -> Path:
        """Write checkpoint `step` as step_<N>, or under `name` (e.g. BEST_DIR: never pruned, replaced in
        place); returns its final path."""
        p, lay = self.parts, self.parts.layout
        final = self.root / (name or step_dir_name(step))
        tmp = self.root / (final.name + TMP_SUFFIX)
        error = self._make_room() if lay.is_main else None
        if broadcast_object(error):
            raise CheckpointError(str(error))
        if lay.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        save_sparse(p.dmp, str(tmp / SPARSE_DIR))
        ema = self.ema
        with ema.applied() as training_weights:  # the model's files get the averaged weights
            if lay.is_main:
                save_file(_dense_tensors(p.model), str(tmp / DENSE_FILE))
                for rel, src in p.files.items():
                    shutil.copyfile(src, tmp / rel)
            experts, positions = _expert_tensors(p.model)
            if experts and lay.expert_dp_rank == 0:
                save_file(experts, str(tmp / experts_file(lay.ep_rank)), metadata={"positions": json.dumps(positions)})
            state = {"optimizer": p.optimizer.state_dict(), "rng": _rng_state(), "trainer": trainer_state}
            if training_weights:
                state["ema"] = ema.training_state(training_weights)
            torch.save(state, tmp / rank_state_file(lay.rank))
        barrier()
        names = checkpoint_files(tmp)  # every rank hashes a share of the files, rank 0 lists them all
        share = {rel: file_digest(tmp / rel) for rel in names[lay.rank :: lay.world_size]}
        files = {k: v for part in all_gather_object(share) for k, v in part.items()}  # type: ignore[union-attr]
        if lay.is_main:
            parent = str(self.parent) if self.parent is not None else None
            meta = CheckpointMeta(
                step, epoch, lay.world_size, lay.ep_size, p.model_name, next_seq(self.root), self.lineage, parent,
                dict(sorted(files.items())), self.config,
            )  # fmt: skip
            (tmp / (META + ".part")).write_text(meta.to_json())
            (tmp / (META + ".part")).rename(tmp / META)
            old = final.with_name(final.name + ".old")
            if final.exists():  # renamed aside first: a crash here still leaves one complete copy
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            if name is None:
                self._prune()
        barrier()
        return final

    def _make_room(self) -> str | None:
        """Before writing: is there room for a checkpoint as large as the last one (+5%)? If not, prune the
        older ones keep_last allows to drop first; if still not, the one line that says how much is needed.
        (A checkpoint that runs out of space half-way is never renamed into place: the previous one stays.)"""
        found = complete_checkpoints(self.root)
        if not found:
            return None
        need = int(1.05 * sum(v[0] for v in read_meta(found[-1]).files.values()))
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free >= need:
            return None
        droppable = [c for c in found[: max(0, len(found) - (self.keep_last - 1))] if c != self.parent]
        for old in droppable:  # the new checkpoint will be one of the keep_last
            shutil.rmtree(old, ignore_errors=True)
            free = shutil.disk_usage(self.root).free
            if free >= need:
                print(f"[checkpoint] low disk space: pruned {old.name} early to make room", flush=True)
                return None
        return (
            f"{self.root}: a checkpoint needs about {need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free "
            "(older checkpoints already pruned as far as training.keep_last allows); free space or lower keep_last"
        )

    def _prune(self) -> None:
        """Keep the keep_last newest written step_* checkpoints and the one this run resumed from; delete
        the rest (an abandoned line after a rollback goes first: it was written earlier)."""
        found = complete_checkpoints(self.root)
        keep = set(found[-self.keep_last :])
        if self.parent is not None:
            keep.add(self.parent)
        for stale in found:
            if stale not in keep:
                shutil.rmtree(stale, ignore_errors=True)

    def load_weights(self, path: Path) -> CheckpointMeta:
        """Restore only the model (tables, dense and expert weights) from `path`, on any layout: how the
        best checkpoint comes back at the end of a run. Collective."""
        p = self.parts
        meta = read_meta(path)
        if meta.model_name != p.model_name:
            raise CheckpointMismatchError(
                f"{path}: written for model.name={meta.model_name!r}, this run has {p.model_name!r}"
            )
        load_sparse(p.dmp, str(path / SPARSE_DIR))
        _, unexpected = _load_dense(p.model, load_file(str(path / DENSE_FILE)))
        if unexpected:
            raise CheckpointMismatchError(f"{path / DENSE_FILE}: unexpected tensors {unexpected[:5]}")
        _load_experts(p.model, path)
        return meta

    def load(self, path: Path) -> tuple[CheckpointMeta, dict[str, Any]]:
        """Restore tables, dense and expert weights, optimizer and RNG; returns (meta, trainer_state).

        Weights load on any world size and ep_size (DCP reshards the tables; experts are re-sliced by
        token position). The dense optimizer state is per expert-parallel layout: it loads when ep_size
        and the world size match the checkpoint, or when both sides use ep_size 1 (replicated state).
        With another world size `trainer_state["loader"]` is None (data positions are per rank).
        """
        p, lay = self.parts, self.parts.layout
        meta = read_meta(path)
        if meta.model_name != p.model_name:
            raise CheckpointMismatchError(
                f"{path}: written for model.name={meta.model_name!r}, this run has {p.model_name!r}"
            )
        same_layout = meta.world_size == lay.world_size and meta.ep_size == lay.ep_size
        if not same_layout and not (meta.ep_size == 1 and lay.ep_size == 1):
            raise CheckpointMismatchError(
                f"{path}: written with world_size={meta.world_size}, ep_size={meta.ep_size}; this run has "
                f"world_size={lay.world_size}, ep_size={lay.ep_size}. The dense optimizer state of sharded experts "
                "only resumes on the same layout (supported: the same world_size and ep_size, or ep_size=1 on both "
                "sides with any world size)"
            )
        load_sparse(p.dmp, str(path / SPARSE_DIR))
        _, unexpected = _load_dense(p.model, load_file(str(path / DENSE_FILE)))
        if unexpected:
            raise CheckpointMismatchError(f"{path / DENSE_FILE}: unexpected tensors {unexpected[:5]}")
        _load_experts(p.model, path)
        state_file = path / rank_state_file(lay.rank if same_layout else 0)
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        p.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        # the files held the averaged weights: they become the average again, the training weights the model's
        self.ema.load_training_state(state.get("ema"), str(state_file))
        if not same_layout:
            state["trainer"]["loader"] = None  # positions are per rank: the trainer checks and explains
        return meta, state["trainer"]


def _load_dense(model: nn.Module, dense: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = model.state_dict(keep_vars=True)
    expert_ids = _expert_ids(model)
    unexpected = [k for k in dense if k not in own]
    missing = [k for k, v in own.items() if k not in dense and id(v) not in expert_ids]
    if missing:
        raise CheckpointMismatchError(
            f"dense.safetensors lacks {missing[:5]} (model config changed since the checkpoint?)"
        )
    with torch.no_grad():
        for k, v in dense.items():
            if k in own:
                own[k].copy_(v)
    return missing, unexpected


def _load_experts(model: nn.Module, path: Path) -> None:
    locals_ = [getattr(layer.experts, "local", layer.experts) for layer in moe_layers(model)]
    if not locals_:
        return
    wanted = [(list(m.positions), [n for n, _ in m.named_parameters()]) for m in locals_]
    with torch.no_grad():
        for local, tensors in zip(locals_, read_expert_shards(path, wanted)):
            for name, p in local.named_parameters():
                p.copy_(tensors[name])


HARMLESS = (
    "metrics.", "training.name", "training.output_dir", "training.resume", "training.steps", "training.epochs",
    "training.log_every", "training.eval_every", "training.eval_batches", "training.checkpoint_every",
    "training.keep_last", "training.early_stopping", "training.restore_best", "data.eval", "data.num_workers",
    "data.prefetch_row_groups", "data.verify_checksums", "parallelism.ep_size",
)  # fmt: skip
"""Config keys (prefixes) a resume may change: logging, cadence, W&B, how far to train, the test split,
readers, the expert-parallel layout (the loader checks what it can resume). Anything else changes the
model, the data or the optimizer."""


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_drift(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """(blocking, harmless): {key: [checkpoint's value, this run's value]} of every changed config key. A key
    on one side only (a field added or removed by another version of this code, whose default keeps the old
    behaviour) is recorded as harmless."""
    a, b = _flat(old), _flat(new)
    changed = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    harmless = {k: v for k, v in changed.items() if k.startswith(HARMLESS) or k not in a or k not in b}
    return {k: v for k, v in changed.items() if k not in harmless}, harmless


def check_config_drift(path: Path, meta: CheckpointMeta, config: dict[str, Any]) -> dict[str, list[Any]]:
    """Stop (ConfigDriftError, one line) when resuming `path` with a config that changes the model, the data or
    the optimizer; return the harmless changes (recorded in summary.json)."""
    if not meta.config:
        return {}  # written before checkpoints carried their config
    blocking, harmless = config_drift(meta.config, config)
    if blocking:
        shown = ", ".join(f"{k} {_short(v[0])} -> {_short(v[1])}" for k, v in list(blocking.items())[:6])
        more = f" (+{len(blocking) - 6} more)" if len(blocking) > 6 else ""
        raise ConfigDriftError(
            f"{path}: this run's config differs from the checkpoint's: {shown}{more}. These change the model, the data "
            "or the optimizer; train into a new training.output_dir, or pass --training.resume never to start over"
        )
    return harmless


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


class ConfigDriftError(CheckpointMismatchError):
    """A resume with a config that changes the model, the data or the optimizer (never a fallback case)."""
