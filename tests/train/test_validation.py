"""Validation during training: the row-order carve, the best-metric tracker, and (2 ranks, the real entry
point) early stopping with the best weights restored, kept across a resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from config.training import TrainingConfig
from pipeline.config import DataConfig, FeaturesConfig
from pipeline.errors import DataError
from pipeline.plan import carve_tail, plan_dataset
from tests.train.test_trainer import base_args
from train.validation import BestTracker, metric_value

# A run that overfits fast (big tables, few rows, high rates, no decay): validation AUC peaks after epoch 1.
DEGRADING = (
    "--moe.enabled", "false", "--data.valid_fraction", "0.2", "--training.steps", "0", "--training.lr", "0.01",
    "--embeddings.lr", "0.3", "--training.lr_decay", "none", "--training.warmup_steps", "0",
    "--training.early_stopping", "--training.early_stopping_patience", "3", "--training.checkpoint_every", "0",
)  # fmt: skip


def test_carve_takes_the_last_rows_in_order(tiny_data) -> None:
    features = FeaturesConfig(labels=["click"], user_id="", dense=[], sparse=[])
    plan = plan_dataset(f"{tiny_data}/train", DataConfig(row_id_column=""), features)
    head, tail = carve_tail(plan, 0.2)
    n = plan.num_rows
    assert head.num_rows == math.floor(n * 0.8) and head.num_rows + tail.num_rows == n
    rows = lambda p: [(u.file_index, u.row_group, r) for u in p.units for r in range(u.start, u.stop)]  # noqa: E731
    assert rows(head) + rows(tail) == rows(plan)  # the same rows, in order, split once
    with pytest.raises(DataError, match="leaves 0 of"):
        carve_tail(plan, 0.99999)


def test_tracker_modes_patience_and_nan() -> None:
    t = BestTracker.from_config(TrainingConfig(early_stopping=True, early_stopping_patience=2))
    m = lambda a, b: {"x": {"auc": a, "logloss": 1 - a}, "y": {"auc": b, "logloss": 1 - b}}  # noqa: E731
    assert metric_value(m(0.6, 0.8), "auc") == pytest.approx(0.7) and metric_value(
        m(0.6, 0.8), "y/logloss"
    ) == pytest.approx(0.2)
    assert t.update(m(0.6, 0.8), 10, 1.0) and t.best == pytest.approx(0.7)
    assert not t.update(m(0.5, 0.8), 20, 2.0) and not t.stopped
    assert not t.update(m(float("nan"), 0.8), 30, 3.0) and t.stopped  # NaN is never an improvement
    low = BestTracker.from_config(TrainingConfig(early_stopping_metric="x/logloss", early_stopping_min_delta=0.05))
    assert low.mode == "min" and low.update(m(0.6, 0.8), 1, 0.0)
    assert not low.update(m(0.62, 0.8), 2, 0.0)  # better, but by less than min_delta
    assert low.update(m(0.7, 0.8), 3, 0.0) and low.best_step == 3 and low.patience == 0 and not low.stopped


def _fit(data: str, out: str, epochs: int) -> dict:
    from launch.train import main

    return main(base_args(data, out, *DEGRADING, "--training.epochs", str(epochs)))


def test_early_stopping_restores_the_best_and_resume_keeps_it(dist_pool, tiny_data, tmp_path) -> None:
    a = str(tmp_path / "a")
    summary = dist_pool.run(_fit, tiny_data, a, 8)[0]
    steps_per_epoch = summary["valid"]["curve"][0]["step"]
    valid = summary["valid"]
    assert valid["best_step"] == steps_per_epoch, valid["curve"]  # the model degrades after epoch 1
    assert valid["stopped_early"] and summary["steps"] == 4 * steps_per_epoch  # patience 3 after the best
    assert [c["step"] for c in valid["curve"]] == [k * steps_per_epoch for k in range(1, 5)]
    assert valid["restored_best"].endswith("checkpoints/best")
    # the final evaluation scored the best weights: the model then equals checkpoints/best
    best = load_file(str(Path(a) / "checkpoints" / "best" / "dense.safetensors"))
    last = load_file(str(Path(a) / "checkpoints" / f"step_{summary['steps']:08d}" / "dense.safetensors"))
    assert any((best[k] != last[k]).any() for k in best), "the last weights should differ from the best"
    evaluated = json.loads((Path(a) / "summary.json").read_text())["eval"]
    assert evaluated == summary["eval"]

    # Stop after 2 epochs (best at 1, one evaluation without improvement), then resume to 8: the tracker's
    # best, patience counter and curve carry on, so training stops at the same step with the same best.
    b = str(tmp_path / "b")
    dist_pool.run(_fit, tiny_data, b, 2)
    resumed = dist_pool.run(_fit, tiny_data, b, 8)[0]
    assert resumed["resumed_from"].endswith(f"step_{2 * steps_per_epoch:08d}")
    assert resumed["valid"]["curve"] == valid["curve"]
    assert (resumed["valid"]["best_step"], resumed["steps"]) == (valid["best_step"], summary["steps"])
    assert resumed["eval"] == summary["eval"]


def test_embedding_l2_is_half_lambda_times_the_mean_squared_pooled_norm() -> None:
    from types import SimpleNamespace

    import torch

    from config import load_config
    from model.output import ModelOutput
    from train.step import TrainStep

    cfg = load_config(["--config", "configs/tiny.toml", "--embeddings.l2", "0.1"])
    step = TrainStep(cfg, SimpleNamespace(model=torch.nn.Linear(1, 1)), total_steps=1)
    logits = torch.zeros(3, 2)
    out = ModelOutput(logits_BK=logits, reg_loss=torch.tensor(0.0))
    batch = SimpleNamespace(labels=torch.zeros(3, 2), weights=torch.tensor([1.0, 1.0, 0.0]))
    sparse = torch.tensor([[1.0, 2.0], [3.0, 0.0], [100.0, 100.0]])  # the padding row (weight 0) does not count
    total, task, _ = step.loss(out, batch, sparse)
    assert float(total - task) == pytest.approx(0.5 * 0.1 * (5.0 + 9.0) / 2)
