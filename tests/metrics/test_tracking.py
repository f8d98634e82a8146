"""MetricsLogger sinks: JSONL rows, injected sinks, rank != 0 silent, console line + bar, W&B."""

from __future__ import annotations

import io
import json
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest

from metrics.config import MetricsConfig
from metrics.tracking import ConsoleSink, MetricsLogger, format_line, resolve_run_id, resolve_wandb_mode

NO_WANDB = MetricsConfig(wandb=False, progress=False)
ROWS = [
    {"loss": 0.7, "samples_per_s": 1000.0, "mfu": 0.125, "lr": 1e-3, "train_auc/ctr": 0.61},
    {"loss": 0.6, "eval/ctr/auc": 0.71, "eval/ctr/uauc": 0.65, "moe/active_LT": [[0.5, 0.25], [1.0, 0.0]]},
    {"loss": float("nan"), "data/skipped_rows": 3, "note": "text"},
]


class Recorder:
    """A sink that records every call."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self.summaries: list[dict[str, Any]] = []
        self.closed = False

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.summaries.append(summary)

    def close(self) -> None:
        self.closed = True


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def log_rows(run_dir: Path, cfg: MetricsConfig, rank: int = 0, resume: bool = False, **kw: Any) -> Recorder:
    rec = Recorder()
    logger = MetricsLogger(
        run_dir, cfg, rank=rank, config_dict={"training": {"lr": 1e-3}}, resume=resume, extra_sinks=[rec], **kw
    )
    for i, row in enumerate(ROWS):
        logger.log(row, step=10 * (i + 1))
    logger.log_summary({"eval/ctr/auc": 0.71})
    logger.close()
    return rec


def test_jsonl_rows_recording_sink_and_console(tmp_path, capsys):
    rec = log_rows(tmp_path / "run", NO_WANDB, total_steps=30)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[0]["loss"] == 0.7 and rows[0]["train_auc/ctr"] == 0.61
    assert rows[1]["moe/active_LT"] == [[0.5, 0.25], [1.0, 0.0]]
    assert rows[2]["loss"] is None and rows[2]["note"] == "text"  # NaN -> null, strict JSON
    assert [(s, m) for s, m in rec.rows] == [(10 * (i + 1), r) for i, r in enumerate(ROWS)]
    assert rec.summaries == [{"eval/ctr/auc": 0.71}] and rec.closed
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"eval/ctr/auc": 0.71}
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0] == "step 10/30 | loss 0.7000 | 1,000 samples/s | MFU 12.50% | lr 1.00e-03 | train auc ctr 0.6100"
    assert "eval ctr auc 0.7100 uauc 0.6500" in lines[1]


def test_resume_appends_fresh_run_truncates(tmp_path):
    run = tmp_path / "run"
    log_rows(run, NO_WANDB)
    log_rows(run, NO_WANDB, resume=True)
    assert len(read_jsonl(run / "metrics.jsonl")) == 6
    log_rows(run, NO_WANDB)
    assert len(read_jsonl(run / "metrics.jsonl")) == 3


def test_other_ranks_write_nothing(tmp_path, capsys):
    rec = log_rows(tmp_path / "run", MetricsConfig(progress=True), rank=1, total_steps=30)
    assert not (tmp_path / "run").exists()
    assert rec.rows == [] and rec.summaries == []
    assert capsys.readouterr().out == ""


def test_progress_bar_and_lines_on_separate_streams():
    out, bar = io.StringIO(), io.StringIO()
    sink = ConsoleSink(total_steps=4, progress=True, stream=out, bar_file=bar, bar_disable=False)
    for step in (1, 2, 4):
        sink.log({"loss": 0.5}, step)
    sink.close()
    assert out.getvalue().splitlines() == [f"step {s}/4 | loss 0.5000" for s in (1, 2, 4)]
    assert "4/4" in bar.getvalue()


def test_format_line_eval_only_and_missing_keys():
    line = format_line({"eval/cvr/auc": 0.8, "eval/cvr/ne": 0.9, "epoch": 1}, step=5)
    assert line == "step 5 | epoch 1 | eval cvr auc 0.8000 ne 0.9000"


def test_resolve_wandb_mode_and_run_id(tmp_path, monkeypatch):
    assert resolve_wandb_mode("offline", {}) == "offline"
    assert resolve_wandb_mode("offline", {"WANDB_API_KEY": "k"}) == "online"
    assert resolve_wandb_mode("offline", {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert resolve_wandb_mode("online", {"WANDB_MODE": "offline"}) == "online"
    assert resolve_wandb_mode("disabled", {"WANDB_API_KEY": "k"}) == "disabled"
    with pytest.raises(ValueError, match="metrics.wandb_mode"):
        resolve_wandb_mode("sometimes", {})
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    first = resolve_run_id(tmp_path, None, resume=False)
    assert resolve_run_id(tmp_path, None, resume=True) == first
    assert resolve_run_id(tmp_path, None, resume=False) != first  # a fresh run gets a fresh id
    again = (tmp_path / "wandb_run_id").read_text().strip()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # elastic restart before any checkpoint
    assert resolve_run_id(tmp_path, None, resume=False) == again
    assert resolve_run_id(tmp_path, "given", resume=True) == "given"


def test_wandb_init_failure_only_warns(tmp_path, monkeypatch):
    import wandb

    def boom(**kwargs: Any) -> None:
        raise RuntimeError("no W&B today")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(RuntimeWarning, match="W&B init failed.*no W&B today"):
        rec = log_rows(tmp_path / "run", MetricsConfig(progress=False))
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 3 and len(rec.rows) == 3


def test_wandb_log_failure_warns_once_and_disables(tmp_path, monkeypatch):
    calls: list[dict[str, Any]] = []

    class FakeRun:
        summary: dict[str, Any] = {}
        id = "fakerun"

        def define_metric(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log(self, row: dict[str, Any]) -> None:
            calls.append(row)
            if len(calls) == 2:
                raise OSError("disk full")

        def finish(self, exit_code: int = 0) -> None:
            pass

    fake = types.SimpleNamespace(init=lambda **kw: FakeRun(), Settings=lambda **kw: None, Image=lambda data: "image")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_rows(tmp_path / "run", MetricsConfig(progress=False))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "W&B log failed (OSError: disk full)" in messages[0]
    assert len(calls) == 2  # disabled after the failure
    assert calls[0] == {**{k: v for k, v in ROWS[0].items()}, "step": 10}
    assert calls[1]["moe/active_LT/heatmap"] == "image" and calls[1]["moe/active_LT/row0_mean"] == 0.375


def test_offline_wandb_run_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a W&B failure would only warn: make it fail here
        log_rows(run, MetricsConfig(progress=False, wandb_mode="offline"))
    run_id = (run / "wandb_run_id").read_text().strip()
    files = list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    data = files[0].read_bytes()
    for key in (b"loss", b"eval/ctr/auc", b"moe/active_LT/row1_mean", b"data/skipped_rows"):
        assert key in data, key


def test_sweep_trial_gets_its_own_run_dir_and_the_agents_run_id(tmp_path, monkeypatch):
    """Under `wandb agent` (WANDB_SWEEP_ID + the trial's WANDB_RUN_ID): the run dir is <output_dir>/<run id>
    (a shared one would make each trial resume the previous one) and the id recorded is the agent's."""
    from config import load_config
    from launch.train import sweep_trial_dir

    cfg = load_config(["--config", "configs/tiny.toml", "--training.output_dir", str(tmp_path / "sweep")])
    sweep_trial_dir(cfg, {})
    assert cfg.output_dir == tmp_path / "sweep"  # no sweep: unchanged
    sweep_trial_dir(cfg, {"WANDB_SWEEP_ID": "s1", "WANDB_RUN_ID": "trial7abc"})
    assert cfg.output_dir == tmp_path / "sweep" / "trial7abc"
    monkeypatch.setenv("WANDB_SWEEP_ID", "s1")
    monkeypatch.setenv("WANDB_RUN_ID", "trial7abc")
    run = cfg.output_dir
    logger = MetricsLogger(run, MetricsConfig(progress=False, wandb_mode="offline"), rank=0, config_dict={})
    logger.log({"loss": 1.0}, 1)
    logger.close()
    assert (run / "wandb_run_id").read_text().strip() == "trial7abc"
    assert list((run / "wandb").glob("offline-run-*-trial7abc"))
