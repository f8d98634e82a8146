"""End-of-run PNG plots from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metrics.config import MetricsConfig
from metrics.plots import read_metrics, write_plots
from metrics.tracking import MetricsLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, with_everything: bool = True) -> None:
    logger = MetricsLogger(run_dir, MetricsConfig(wandb=False, progress=False), rank=0, config_dict={})
    for step in range(10, 110, 10):
        row: dict = {"loss": 0.7 - step / 1000, "loss/ctr": 0.6 - step / 1000}
        if with_everything:
            row |= {
                "samples_per_s": 1000.0 + step,
                "samples_per_s_per_rank": 500.0 + step / 2,
                "mfu": 0.1 + step / 2000,
                "train_auc/ctr": 0.6 + step / 1000,
                "train_auc/cvr": 0.55 + step / 1000,
            }
            if step % 50 == 0:
                row |= {"eval/ctr/auc": 0.7, "eval/ctr/uauc": 0.65, "eval/ctr/logloss": 0.5, "eval/cvr/auc": 0.6}
                row["moe/active_LT"] = [[(t + layer) / 8 for t in range(4)] for layer in range(2)]
        logger.log(row, step)
    logger.close()


def test_all_plots_written_and_non_empty(tmp_path):
    write_run(tmp_path)
    paths = write_plots(tmp_path)
    assert sorted(p.name for p in paths) == ["auc.png", "loss.png", "moe_activation.png", "throughput.png"]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, p


def test_plots_with_absent_keys_are_skipped(tmp_path):
    write_run(tmp_path, with_everything=False)
    assert [p.name for p in write_plots(tmp_path)] == ["loss.png"]


def test_missing_file_and_cut_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_plots(tmp_path)
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "loss": 0.8}]  # step 2 again (resumed)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl:4"):
        series, _ = read_metrics(path)
    assert series["loss"] == {1: 1.0, 2: 0.8}  # the later row wins


def test_ragged_activation_matrix_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "moe/active_LT": [[0.1, 0.2], [0.3]]}) + "\n")
    with pytest.raises(ValueError, match="moe/active_LT.*different lengths"):
        write_plots(tmp_path)
