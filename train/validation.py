"""Validation during training: scoring a split, following one metric, early stopping.

    tracker = BestTracker.from_config(cfg.training, tasks)
    metrics = evaluate_split(step_fn, loader, tasks, device)     # {task: {auc, uauc, logloss, ne, ...}}
    improved = tracker.update(metrics, step)                    # -> save checkpoints/best when True
    if tracker.stopped: ...                                       # patience exhausted

`training.early_stopping_metric` is 'auc', 'uauc', 'logloss' or 'ne' averaged over the tasks, or
'<task>/<metric>'; AUC-like metrics improve upwards, losses downwards, by more than
`early_stopping_min_delta`. The tracker's state (best value and step, evaluations without improvement,
the curve, whether training stopped) is plain data, saved with every checkpoint, so a resumed run keeps
its best and its patience counter.

Legend: B batch per rank, K tasks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from config.training import VALID_METRICS, TrainingConfig
from metrics.streaming import eval_accumulator
from pipeline.loader import ParquetLoader
from train.step import TrainStep


@torch.no_grad()
def evaluate_split(
    step_fn: TrainStep, loader: ParquetLoader, tasks: list[str], device: torch.device, limit: int = 0
) -> dict[str, dict[str, float]]:
    """Metrics of one split over all ranks (each row once): {task: {auc, uauc, logloss, ne, count, ctr}}.

    Collective: every rank scores its share of `loader`; `limit` > 0 stops after that many batches per rank.
    The modules are put in eval mode for the pass and back in train mode after it.
    """
    par = step_fn.par
    par.engine.eval()
    par.dmp.eval()
    m = step_fn.cfg.metrics
    acc = eval_accumulator(tasks, device, bool(step_fn.cfg.features.user_id), m.eval_auc, m.eval_auc_bins)
    for i, batch in enumerate(loader):
        if limit and i >= limit:
            break
        batch = batch.to(device, non_blocking=True)
        out = step_fn.forward(batch)
        acc.update(torch.sigmoid(out.logits_BK.float()), batch.labels, batch.user_ids, batch.weights)
    par.engine.train()
    par.dmp.train()
    return acc.compute()


def metric_value(metrics: dict[str, dict[str, float]], name: str) -> float:
    """`name` ('auc' mean over tasks, or 'click/auc') read from evaluation metrics (NaN when undefined)."""
    if "/" in name:
        task, metric = name.rsplit("/", 1)
        return float(metrics[task][metric])
    values = [float(m[name]) for m in metrics.values()]
    return sum(values) / len(values) if values else math.nan


@dataclass
class BestTracker:
    """The best validation evaluation so far, and early stopping.

    Attributes:
        metric: what is followed ('auc', 'click/logloss', ...); mode 'max' or 'min'.
        patience: evaluations without improvement that stop training (0: never stop).
        min_delta: the smallest change that counts as an improvement.
        best, best_step: the best value and the step it was reached at (None before any evaluation).
        bad_evals: evaluations since the last improvement.
        stopped: patience ran out (a resumed run does not train further).
        curve: [{"step", "epoch", "value"}] of every validation evaluation.
    """

    metric: str
    mode: str
    patience: int
    min_delta: float
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped: bool = False
    curve: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def from_config(t: TrainingConfig) -> BestTracker:
        mode = VALID_METRICS[t.early_stopping_metric.rsplit("/", 1)[-1]]
        patience = t.early_stopping_patience if t.early_stopping else 0
        return BestTracker(t.early_stopping_metric, mode, patience, t.early_stopping_min_delta)

    def update(self, metrics: dict[str, dict[str, float]], step: int, epoch: float) -> bool:
        """Record one validation evaluation; True when it is the best so far (then save it)."""
        value = metric_value(metrics, self.metric)
        self.curve.append({"step": step, "epoch": epoch, "value": value})
        if math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        elif self.mode == "max":
            improved = value > self.best + self.min_delta
        else:
            improved = value < self.best - self.min_delta
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
            self.stopped = self.patience > 0 and self.bad_evals >= self.patience
        return improved

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
