"""Ranking and calibration metrics for CTR-style tasks, exact and distributed-correct.

Shapes: B rows (impressions), K tasks, N rows after concatenation, G groups (users), Q tie groups.

* `auc`: the Mann-Whitney rank statistic, ties counted one half, every pair weighted by the product
  of the two impression weights (weight 0 = ignore the row).
* `uauc`: the AUC of every user with both classes, averaged with the user's impression weight
  (the sum of its row weights, i.e. its number of impressions for 0/1 weights); users with a
  single class are left out. One sort by (user, score), no Python loop per user.
* `logloss`: the weighted mean binary cross-entropy of probabilities; `normalized_entropy` divides
  it by the entropy of the weighted base rate (NE < 1 beats predicting the base rate).
* `EvalAccumulator`: collects eval batches on every rank; `compute()` all-gathers (variable sizes
  per rank) and returns the same numbers on every rank, equal to a single process on the same rows.
* `WindowedAUC`: AUC per task over the last `window` training steps.

Labels are 0/1 (a label > 0.5 counts as positive for the rank metrics). Everything is computed in
float64; undefined values (one class only, no rows) are NaN.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist
from torch import Tensor

_EPS = 1e-7  # probability clamp for logloss, so a confident mistake costs ~16 nats, not inf


def _check_rows(name: str, **tensors: Tensor | None) -> int:
    """All given tensors are 1-D with the same length; returns it."""
    n = -1
    for key, t in tensors.items():
        if t is None:
            continue
        if t.dim() != 1:
            raise ValueError(f"{name}: `{key}` must be 1-D (N), got shape {tuple(t.shape)}")
        if n >= 0 and t.shape[0] != n:
            raise ValueError(f"{name}: `{key}` has {t.shape[0]} rows, expected {n} like the scores")
        n = t.shape[0]
    return n


def _grouped_auc(
    scores_N: Tensor, labels_N: Tensor, weights_N: Tensor | None, groups_N: Tensor
) -> tuple[Tensor, Tensor]:
    """AUC of every group at once.

    Args:
        scores_N: scores (any monotone score; probabilities or logits).
        labels_N: 0/1 labels.
        weights_N: impression weights (None = 1); rows with weight <= 0 are dropped.
        groups_N: int64 group id per row (user id; all zeros for a global AUC).

    Returns:
        (auc_G, impressions_G) float64 over the groups present (sorted by id): the AUC (NaN where a
        group lacks a class) and the sum of the group's weights.
    """
    s = scores_N.detach().to(torch.float64)
    y = labels_N.detach() > 0.5
    w = torch.ones_like(s) if weights_N is None else weights_N.detach().to(torch.float64)
    g = groups_N.detach().to(torch.int64)
    keep = w > 0
    if not bool(keep.all()):
        s, y, w, g = s[keep], y[keep], w[keep], g[keep]
    if s.numel() == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=s.device)
        return empty, empty
    # Lexicographic sort by (group, score): a stable sort by score, then a stable sort by group.
    by_score = torch.argsort(s, stable=True)
    perm = by_score[torch.argsort(g[by_score], stable=True)]
    s, y, w, g = s[perm], y[perm], w[perm], g[perm]

    new_group = torch.ones_like(g, dtype=torch.bool)
    new_group[1:] = g[1:] != g[:-1]
    new_tie = new_group.clone()
    new_tie[1:] |= s[1:] != s[:-1]
    tie_id = torch.cumsum(new_tie, 0) - 1  # N -> Q
    num_ties = int(tie_id[-1]) + 1
    pos_Q = torch.zeros(num_ties, dtype=torch.float64, device=s.device).index_add_(0, tie_id, w * y)
    neg_Q = torch.zeros(num_ties, dtype=torch.float64, device=s.device).index_add_(0, tie_id, w * ~y)

    group_of_tie = torch.cumsum(new_group[new_tie], 0) - 1  # Q -> G
    num_groups = int(group_of_tie[-1]) + 1
    # Negative weight strictly below each tie group, within its own group.
    neg_before_Q = torch.cumsum(neg_Q, 0) - neg_Q
    first_tie_of_group = torch.nonzero(new_group[new_tie]).squeeze(1)
    neg_below_Q = neg_before_Q - neg_before_Q[first_tie_of_group][group_of_tie]
    wins_Q = pos_Q * (neg_below_Q + 0.5 * neg_Q)

    zeros_G = torch.zeros(num_groups, dtype=torch.float64, device=s.device)
    wins_G = zeros_G.clone().index_add_(0, group_of_tie, wins_Q)
    pos_G = zeros_G.clone().index_add_(0, group_of_tie, pos_Q)
    neg_G = zeros_G.clone().index_add_(0, group_of_tie, neg_Q)
    pairs_G = pos_G * neg_G
    auc_G = torch.where(pairs_G > 0, wins_G / pairs_G.clamp_min(1e-300), torch.full_like(pairs_G, math.nan))
    return auc_G, pos_G + neg_G


def auc(scores: Tensor, labels: Tensor, weights: Tensor | None = None) -> float:
    """Weighted ROC AUC by the rank statistic (ties count 1/2); NaN when a class is missing.

    Args:
        scores: N scores.
        labels: N labels in {0, 1}.
        weights: N impression weights (None = 1; 0 = ignore the row).
    """
    _check_rows("auc", scores=scores, labels=labels, weights=weights)
    zeros = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)
    auc_G, _ = _grouped_auc(scores, labels, weights, zeros)
    return float(auc_G[0]) if auc_G.numel() else math.nan


def uauc(scores: Tensor, labels: Tensor, user_ids: Tensor, weights: Tensor | None = None) -> float:
    """User-averaged AUC: per-user AUC over users with both classes, weighted by their impressions.

    Args:
        scores: N scores.
        labels: N labels in {0, 1}.
        user_ids: N int64 user ids.
        weights: N impression weights (None = 1; 0 = ignore the row).

    Returns:
        sum_u auc_u * imp_u / sum_u imp_u over users having both classes (NaN when there are none).
    """
    _check_rows("uauc", scores=scores, labels=labels, user_ids=user_ids, weights=weights)
    auc_G, imp_G = _grouped_auc(scores, labels, weights, user_ids)
    valid = ~torch.isnan(auc_G)
    if not bool(valid.any()):
        return math.nan
    return float((auc_G[valid] * imp_G[valid]).sum() / imp_G[valid].sum())


def _weighted(labels: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    y = labels.detach().to(torch.float64)
    w = torch.ones_like(y) if weights is None else weights.detach().to(torch.float64).clamp_min(0.0)
    return y, w


def logloss(scores: Tensor, labels: Tensor, weights: Tensor | None = None) -> float:
    """Weighted mean binary cross-entropy (nats) of probabilities `scores` (clamped to [1e-7, 1 - 1e-7]).

    Args:
        scores: N probabilities.
        labels: N labels in [0, 1].
        weights: N impression weights (None = 1; 0 = ignore the row).
    """
    _check_rows("logloss", scores=scores, labels=labels, weights=weights)
    y, w = _weighted(labels, weights)
    p = scores.detach().to(torch.float64).clamp(_EPS, 1.0 - _EPS)
    total = w.sum()
    if float(total) <= 0:
        return math.nan
    return float((w * -(y * torch.log(p) + (1.0 - y) * torch.log1p(-p))).sum() / total)


def normalized_entropy(scores: Tensor, labels: Tensor, weights: Tensor | None = None) -> float:
    """Logloss divided by the entropy of the weighted base rate; NaN when the base rate is 0 or 1.

    Args:
        scores: N probabilities.
        labels: N labels in [0, 1].
        weights: N impression weights (None = 1; 0 = ignore the row).
    """
    _check_rows("normalized_entropy", scores=scores, labels=labels, weights=weights)
    y, w = _weighted(labels, weights)
    total = float(w.sum())
    if total <= 0:
        return math.nan
    rate = float((w * y).sum()) / total
    if rate <= 0.0 or rate >= 1.0:
        return math.nan
    entropy = -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))
    return logloss(scores, labels, weights) / entropy


def eval_metrics_flat(result: dict[str, dict[str, float]], prefix: str = "eval") -> dict[str, float]:
    """`EvalAccumulator.compute()` output -> {"<prefix>/<task>/<name>": value} for `MetricsLogger.log`."""
    return {f"{prefix}/{task}/{name}": value for task, values in result.items() for name, value in values.items()}


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather_rows(x_N: Tensor) -> Tensor:
    """Concatenate every rank's rows (rank order); row counts may differ between ranks.

    Args:
        x_N: N x ... rows on this rank (the device the backend needs).

    Returns:
        (sum of N over ranks) x ... ; `x_N` itself without a process group.
    """
    world = _world()
    if world == 1:
        return x_N
    n = torch.tensor([x_N.shape[0]], dtype=torch.int64, device=x_N.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(c) for c in sizes]
    padded = x_N.new_zeros((max(counts), *x_N.shape[1:]))
    padded[: x_N.shape[0]] = x_N
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)


def _check_batch(name: str, tasks: list[str], probs_BK: Tensor, labels_BK: Tensor, weights_B: Tensor) -> None:
    k = len(tasks)
    if probs_BK.dim() != 2 or probs_BK.shape[1] != k:
        raise ValueError(f"{name}: probs must be B x K with K={k} tasks {tasks}, got {tuple(probs_BK.shape)}")
    if labels_BK.shape != probs_BK.shape:
        raise ValueError(f"{name}: labels shape {tuple(labels_BK.shape)} != probs shape {tuple(probs_BK.shape)}")
    if weights_B.shape != (probs_BK.shape[0],):
        raise ValueError(f"{name}: weights must be B={probs_BK.shape[0]}, got shape {tuple(weights_B.shape)}")


class EvalAccumulator:
    """Collects eval batches on every rank and computes every metric over all ranks.

    Example:
        acc = EvalAccumulator(["ctr", "cvr"])
        for batch in eval_loader:
            acc.update(torch.sigmoid(logits_BK), batch.labels, batch.user_ids, batch.weights)
        metrics = acc.compute()   # {"ctr": {"auc", "uauc", "logloss", "ne", "count", "ctr"}, ...}

    Rows with weight 0 (padding) are dropped in `update`. Rows stay on the device they arrive on
    (so the all-gather uses the backend's device) until `compute()`, which returns the same dict
    on every rank ("count" = rows with weight > 0, "ctr" = weighted mean label).
    """

    def __init__(self, tasks: list[str], device: torch.device | None = None, users: bool = True) -> None:
        """
        Args:
            tasks: the K task names, in label-column order.
            device: where a rank without rows keeps its (empty) tensors for the all-gather; default
                the first update's device, else torch's default device. Pass the training device
                (NCCL only reduces CUDA tensors).
            users: the user ids are real (features.user_id set); False: UAUC is NaN, not the AUC of one
                "user" holding every row.
        """
        if not tasks:
            raise ValueError("EvalAccumulator: `tasks` is empty; expected the task names (features.labels)")
        self.tasks = list(tasks)
        self.device = device
        self.users = users
        self.reset()

    def reset(self) -> None:
        """Forget every collected row."""
        self._vals: list[Tensor] = []  # each M x (2K + 1): probs, labels, weights
        self._users: list[Tensor] = []  # each M int64

    def update(self, probs_BK: Tensor, labels_BK: Tensor, user_ids_B: Tensor, weights_B: Tensor) -> None:
        """Add one batch.

        Args:
            probs_BK: B x K predicted probabilities.
            labels_BK: B x K labels in {0, 1}.
            user_ids_B: B int64 user ids.
            weights_B: B impression weights (0 = padding row, dropped).
        """
        _check_batch("EvalAccumulator.update", self.tasks, probs_BK, labels_BK, weights_B)
        if user_ids_B.shape != weights_B.shape:
            raise ValueError(f"EvalAccumulator.update: user_ids shape {tuple(user_ids_B.shape)}, expected (B,)")
        if self.device is None:
            self.device = probs_BK.device
        keep = weights_B > 0
        vals = torch.cat(
            [probs_BK.detach().float(), labels_BK.detach().float(), weights_B.detach().float()[:, None]], 1
        )
        self._vals.append(vals[keep])
        self._users.append(user_ids_B.detach().to(torch.int64)[keep])

    def compute(self) -> dict[str, dict[str, float]]:
        """All-gather the rows of every rank (when a process group is up) and compute the metrics.

        Returns:
            {task: {"auc", "uauc", "logloss", "ne", "count", "ctr"}}, identical on every rank.
        """
        k = len(self.tasks)
        device = self.device or torch.get_default_device()
        vals = torch.cat(self._vals) if self._vals else torch.zeros(0, 2 * k + 1, device=device)
        users = torch.cat(self._users) if self._users else torch.zeros(0, dtype=torch.int64, device=device)
        vals, users = _all_gather_rows(vals), _all_gather_rows(users)
        weights = vals[:, 2 * k]
        total = float(weights.to(torch.float64).sum())
        out: dict[str, dict[str, float]] = {}
        for i, task in enumerate(self.tasks):
            p, y = vals[:, i], vals[:, k + i]
            rate = float((y.to(torch.float64) * weights).sum()) / total if total > 0 else math.nan
            out[task] = {
                "auc": auc(p, y, weights),
                "uauc": uauc(p, y, users, weights) if self.users else math.nan,
                "logloss": logloss(p, y, weights),
                "ne": normalized_entropy(p, y, weights),
                "count": int(vals.shape[0]),
                "ctr": rate,
            }
        return out


class WindowedAUC:
    """Training AUC per task over the last `window` steps (a sliding window of whole batches).

    Args:
        tasks: the K task names.
        window: number of most recent `update` calls kept.
        distributed: all-gather the window over the default process group in `compute()` (a
            collective: then every rank must call it at the same steps); False = this rank only.
        device: where the (empty) window lives before the first update; default torch's default
            device. Pass the training device (NCCL only reduces CUDA tensors).
    """

    def __init__(
        self, tasks: list[str], window: int, distributed: bool = False, device: torch.device | None = None
    ) -> None:
        if window < 1:
            raise ValueError(f"WindowedAUC: window must be >= 1 (metrics.train_auc_window), got {window}")
        self.tasks = list(tasks)
        self.distributed = distributed
        self._steps: deque[Tensor] = deque(maxlen=window)  # each B x (2K + 1), padding rows included
        self._device = device or torch.get_default_device()

    def update(self, probs_BK: Tensor, labels_BK: Tensor, weights_B: Tensor) -> None:
        """Add one step's batch: B x K probabilities, B x K labels, B weights (0 = padding)."""
        _check_batch("WindowedAUC.update", self.tasks, probs_BK, labels_BK, weights_B)
        vals = torch.cat(
            [probs_BK.detach().float(), labels_BK.detach().float(), weights_B.detach().float()[:, None]], 1
        )
        self._steps.append(vals)  # padding rows (weight 0) dropped in compute(): no device sync per step
        self._device = probs_BK.device

    def compute(self) -> dict[str, float]:
        """{task: AUC over the window} (NaN before any update or when a class is missing)."""
        k = len(self.tasks)
        if self._steps:
            vals = torch.cat(list(self._steps))
        else:
            vals = torch.zeros(0, 2 * k + 1, device=self._device)
        vals = vals[vals[:, 2 * k] > 0]
        if self.distributed:
            vals = _all_gather_rows(vals)
        return {t: auc(vals[:, i], vals[:, k + i], vals[:, 2 * k]) for i, t in enumerate(self.tasks)}

    def reset(self) -> None:
        """Empty the window."""
        self._steps.clear()
