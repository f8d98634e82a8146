"""Checkpoint discovery: only complete checkpoints count, a crash mid-save leaves the previous one, and
a missing checkpoint is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checkpoint.format import CheckpointError, complete_checkpoints, read_meta
from train.checkpoint import resolve_resume


def _ckpt(root: Path, name: str, meta: bool = True) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if meta:
        step = int(name.split("_")[1].split(".")[0])
        meta_d = {"step": step, "epoch": 0, "world_size": 2, "ep_size": 1, "model_name": "rankmixer"}
        (d / "meta.json").write_text(json.dumps(meta_d))
    return d


def test_only_complete_checkpoints_count(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _ckpt(root, "step_00000010")
    _ckpt(root, "step_00000100")
    _ckpt(root, "step_00000200.tmp")  # a crash mid-save: never renamed into place
    _ckpt(root, "step_00000300", meta=False)  # no meta.json: incomplete
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000010", "step_00000100"]
    assert resolve_resume("auto", root).name == "step_00000100"
    assert read_meta(root / "step_00000100").step == 100


def test_resume_modes(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert resolve_resume("auto", root) is None  # a fresh run
    assert resolve_resume("never", root) is None
    _ckpt(root, "step_00000010")
    assert resolve_resume("never", root) is None
    assert resolve_resume(str(root / "step_00000010"), root) == root / "step_00000010"


def test_missing_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _ckpt(root, "step_00000010")
    with pytest.raises(CheckpointError) as e:
        resolve_resume(str(tmp_path / "nope" / "step_5"), root)
    msg = str(e.value)
    assert "\n" not in msg and "nope/step_5" in msg and "step_00000010" in msg


def test_unreadable_meta_names_the_file(tmp_path: Path) -> None:
    d = _ckpt(tmp_path, "step_00000001", meta=False)
    (d / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json: unreadable checkpoint metadata"):
        read_meta(d)
