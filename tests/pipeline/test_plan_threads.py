"""Planning reads footers on `data.plan_threads` threads: the same plan as one thread, and the same
first bad file reported (path order), whatever the threads."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from config import load_config
from pipeline.errors import DataError
from pipeline.plan import plan_dataset
from pipeline.tools.synth import generate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def many_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    generate(root / "src", 600, 1, 0, 0.0, 50, "zstd")
    (one,) = sorted((root / "src" / "train").glob("*.parquet"))
    out = root / "data"
    out.mkdir()
    for i in range(40):
        shutil.copy(one, out / f"part-{i:03d}.parquet")
    return out


def _cfg(threads: int, on_bad_file: str = "error"):
    cfg = load_config(["--config", str(REPO / "configs" / "tiny.toml")])
    return dataclasses.replace(cfg.data, plan_threads=threads, on_bad_file=on_bad_file), cfg.features  # 0 = auto


def test_threads_give_the_serial_plan(many_files: Path) -> None:
    serial = plan_dataset(str(many_files), *_cfg(1))
    threaded = plan_dataset(str(many_files), *_cfg(16))
    assert serial.files == threaded.files and serial.units == threaded.units
    assert serial.num_rows == 40 * 600 and len(serial.units) == 40 * 12


def test_first_bad_file_in_path_order_whatever_the_threads(many_files: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad"
    shutil.copytree(many_files, data)
    for i in (7, 31):
        (data / f"part-{i:03d}.parquet").write_bytes(b"not parquet at all")
    for threads in (1, 0, 16):
        with pytest.raises(DataError, match=r"part-007\.parquet: not a readable Parquet file"):
            plan_dataset(str(data), *_cfg(threads))
        plan = plan_dataset(str(data), *_cfg(threads, "skip"))
        assert [Path(p).name for p, _ in plan.skipped] == ["part-007.parquet", "part-031.parquet"]
        assert len(plan.files) == 38
