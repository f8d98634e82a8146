"""Trusting the run directory: safe checkpoint metadata, verified files with fallback, lineage after a
rollback, config drift, the run lock, clean metrics after a resume, disk space, the audit with drop_last,
data-integrity errors and the raw-id rule. Each case failed (silently or with a traceback) before."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from checkpoint.format import CheckpointError, CheckpointMeta, complete_checkpoints, read_meta
from checkpoint.safe_dcp import load_metadata
from config import ConfigError, load_config
from pipeline.errors import DataError
from pipeline.loader import worker_message
from tests.train.test_trainer import base_args
from train.checkpoint import config_drift
from train.rundir import RunLock, drop_rows_after


class _Payload:
    """A pickle that runs a command when loaded (what a crafted .metadata would carry)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_dcp_metadata_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = pickle.dumps(_Payload(marker))
    with pytest.raises(CheckpointError, match=r"refuses to unpickle posix.system|refuses to unpickle os.system"):
        load_metadata(str(tmp_path / ".metadata"), data)
    assert not marker.exists(), "the payload ran"
    with pytest.raises(CheckpointError, match="unreadable DCP metadata"):
        load_metadata(str(tmp_path / ".metadata"), b"\x80\x04garbage")


def test_config_drift_splits_blocking_from_harmless() -> None:
    old = load_config(["--config", "configs/tiny.toml"]).to_dict()
    new = load_config(["--config", "configs/tiny.toml", "--training.lr", "0.01", "--training.log_every", "2"]).to_dict()
    blocking, harmless = config_drift(old, new)
    assert blocking == {"training.lr": [0.003, 0.01]} and harmless == {"training.log_every": [5, 2]}
    # A checkpoint written before a field existed (its default keeps the old behaviour) still resumes.
    del old["data"]["verify_checksums"]
    blocking, harmless = config_drift(old, new)
    assert "data.verify_checksums" in harmless and list(blocking) == ["training.lr"]


def test_run_lock_names_the_holder_and_takes_over_stale_ones(tmp_path: Path) -> None:
    a, b = RunLock(tmp_path), RunLock(tmp_path)
    assert a.try_acquire() == (None, None) and a.held
    error, _ = b.try_acquire()
    assert error and f"in use by pid {os.getpid()}" in error and ".lock" in error
    a.release()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2**22 + 17, "host": os.uname().nodename, "started": "x"}))
    error, warning = b.try_acquire()
    assert error is None and "stale" in warning and b.held


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (5, 10, 15, 20)] + ['{"step": 2']  # a row cut by a crash
    path.write_text("\n".join(rows) + "\n")
    assert drop_rows_after(path, 10) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10]


def test_reader_process_errors_are_one_line() -> None:
    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n  File ..., "
        "line 3\npipeline.errors.DataError: f.parquet: column 'click' row group 0: 1 null labels"
    )
    assert worker_message(wrapped) == "f.parquet: column 'click' row group 0: 1 null labels"


def test_raw_ids_only_for_managed_collision_tables() -> None:
    with pytest.raises(ConfigError, match=r"'raw' passes ids unchanged.*Use 'modulo'"):
        load_config(
            [
                "--config",
                "configs/tiny.toml",
                "--features.sparse",
                '[{name = "u0", group = "user", id_mapping = "raw"}]',
            ]
        )


def test_corrupted_data_page_names_file_column_and_row_group(tmp_path: Path) -> None:
    from pipeline.config import DataConfig, FeaturesConfig
    from pipeline.plan import plan_dataset
    from pipeline.reader import PieceReader
    from pipeline.tools.synth import main as synth

    synth(["--out", str(tmp_path), "--rows", "3000", "--files", "1", "--seed", "4", "--row-group-size", "3000"])
    path = next((tmp_path / "train").glob("*.parquet"))
    md = pq.ParquetFile(path).metadata
    col = md.row_group(0).column(md.schema.to_arrow_schema().get_field_index("d3"))
    data = bytearray(path.read_bytes())
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data[start + col.total_compressed_size - 16] ^= 0x5A  # one flipped byte near the end of d3's last data page
    path.write_bytes(bytes(data))
    features = FeaturesConfig(labels=["click"], user_id="", dense=["d3"], sparse=[])
    plan = plan_dataset(str(tmp_path / "train"), DataConfig(row_id_column=""), features)
    with pytest.raises(DataError, match=rf"{path.name}: column 'd3' row group 0: cannot decode.*CRC"):
        PieceReader(plan, DataConfig(row_id_column=""), features).read(plan.units[0])


def test_disk_space_is_checked_before_writing(tmp_path: Path, monkeypatch) -> None:
    import shutil as _shutil
    from types import SimpleNamespace

    from train import checkpoint as ck

    root = tmp_path / "checkpoints"
    for step, seq in ((4, 1), (8, 2), (12, 3)):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(CheckpointMeta(step, 0, 1, 1, "m", seq, files={"x": [100 * 2**20, "0"]}).to_json())
    manager = ck.CheckpointManager.__new__(ck.CheckpointManager)
    manager.root, manager.keep_last, manager.parent = root, 2, None
    free = {"bytes": 50 * 2**20}
    monkeypatch.setattr(_shutil, "disk_usage", lambda _: SimpleNamespace(free=free["bytes"]))
    error = manager._make_room()  # 105 MiB needed, 50 free: prunes what keep_last allows (2 oldest), still short
    assert error and "needs about 105.0 MiB and 50.0 MiB are free" in error
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000012"]
    free["bytes"] = 200 * 2**20
    assert manager._make_room() is None


def _resume_cases(data: str, out: str) -> dict:
    import torch.distributed as dist

    from launch.train import main

    steps = lambda n, *more: main(base_args(data, out, "--training.steps", str(n), "--training.checkpoint_every", "4",  # noqa: E731
                                            "--training.keep_last", "3", "--moe.enabled", "false", *more))  # fmt: skip
    root = Path(out) / "checkpoints"
    result: dict = {}
    steps(12)  # step_4, step_8, step_12
    # Corrupt files: 'auto' verifies every file and falls back to the checkpoint written before.
    dense = root / "step_00000012" / "dense.safetensors"
    if dist.get_rank() == 0:  # one rank edits the shared run directory (two flips would cancel out)
        blob = bytearray(dense.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        dense.write_bytes(bytes(blob))
    dist.barrier()
    result["after_corrupt"] = steps(12)["resumed_from"]
    if dist.get_rank() == 0:
        (root / "step_00000012" / "sparse" / ".metadata").unlink()
    dist.barrier()
    result["after_missing"] = steps(12)["resumed_from"]
    # Rollback: resume step_4 explicitly and stop at 10; 'auto' then continues the new line, not step_12.
    summary = steps(10, "--training.resume", str(root / "step_00000004"))
    result["rollback_parent"] = read_meta(root / "step_00000010").parent
    result["rollback"] = summary["resumed_from"]
    result["kept"] = [p.name for p in complete_checkpoints(root)]
    result["auto_after_rollback"] = steps(12)["resumed_from"]
    # A changed learning rate would silently continue the run with a model trained at another one: it stops.
    try:
        steps(12, "--training.lr", "0.05")
        result["drift"] = None
    except SystemExit as e:
        result["drift"] = str(e)
    result["harmless"] = steps(12, "--training.log_every", "3")["config_changes"]
    return result


def test_resume_verifies_falls_back_follows_the_newest_line_and_refuses_drift(dist_pool, tiny_data, tmp_path) -> None:
    out = str(tmp_path / "run")
    r = dist_pool.run(_resume_cases, tiny_data, out)[0]
    assert r["after_corrupt"].endswith("step_00000008")  # step_12's dense weights failed their SHA-256
    assert r["after_missing"].endswith("step_00000008")  # step_12 (rewritten) lost its DCP metadata
    assert r["rollback"].endswith("step_00000004") and r["rollback_parent"].endswith("step_00000004")
    assert r["auto_after_rollback"].endswith("step_00000010"), r  # the newest written line, not the higher step
    assert "step_00000004" in r["kept"]  # the rollback's parent is never pruned while that line runs
    assert r["drift"] and "training.lr 0.003 -> 0.05" in r["drift"] and "new training.output_dir" in r["drift"]
    assert r["harmless"] == {"training.log_every": [1, 3]}


def _epoch_audit(data: str, out: str) -> dict:
    from launch.train import main

    return main(base_args(data, out, "--training.steps", "0", "--training.epochs", "1", "--moe.enabled", "false"))


def test_drop_last_epoch_is_exactly_once(dist_pool, tiny_data, tmp_path) -> None:
    summary = dist_pool.run(_epoch_audit, tiny_data, str(tmp_path / "epoch"))[0]
    audit = summary["audit"]
    assert audit["exactly_once"] is True, audit  # drop_last (tiny.toml's default) left rows out: counted apart
    dropped = audit["dropped"]["0"]
    assert 0 < dropped < 2 * 64 and audit["epochs"][0]["count"] + dropped == audit["dataset"]["count"]
    assert np.isclose(summary["rows_consumed"], audit["epochs"][0]["count"])
