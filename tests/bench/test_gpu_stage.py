"""bench.gpu_stage: one device call per wheelhouse part (tree + part within the per-call limit), then
the install and the device check; a part too large for a call is refused in one line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bench import gpu_stage
from launch import parts

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def wheelhouse(tmp_path: Path):
    src = tmp_path / "wheels"
    src.mkdir()
    (src / "a-1-py3-none-any.whl").write_bytes(os.urandom(300_000))
    (src / "b-1-py3-none-any.whl").write_bytes(os.urandom(200_000))
    out = REPO / "dist" / f"stage_test_{os.getpid()}"  # under the repository (git-ignored), as a real build
    parts.split(src, out, 128 * 1024, "wheelhouse")
    yield out
    shutil.rmtree(out, ignore_errors=True)


def test_one_call_per_part_then_install_and_check(wheelhouse: Path) -> None:
    plan = gpu_stage.calls(wheelhouse, 64 * 1024 * 1024)
    n = len(list(wheelhouse.glob("wheelhouse.part*")))
    assert n == 4 and len(plan) == n + 1
    rel = wheelhouse.relative_to(REPO)
    for i, call in enumerate(plan[:-1]):
        assert call["carry"] == [f"{rel}/manifest.json", f"{rel}/wheelhouse.part{i:03d}"]
        assert f"mv {rel}/manifest.json {rel}/wheelhouse.part{i:03d} .stage/wheelhouse/" in call["command"]
    assert all(c.startswith(".build/native/") and c.endswith(".so") for c in plan[-1]["carry"])
    last = plan[-1]["command"]
    assert last.startswith("python3 -m launch.wheelhouse install .stage/wheelhouse && python3 -m bench.gpu_check")


def test_a_part_too_large_for_a_call_is_refused(wheelhouse: Path) -> None:
    with pytest.raises(SystemExit, match=r"wheelhouse.part000 \(131072 bytes\) \+ the tree .* rebuild with a smaller"):
        gpu_stage.calls(wheelhouse, gpu_stage.tree_bytes() + 100_000)
