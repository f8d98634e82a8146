"""Evaluation metrics whose memory per rank does not grow with the evaluation set (AUC, logloss, NE),
or grows as 1/world of it (UAUC).

* AUC: every rank adds each row's weight to a histogram per task and class over a fixed grid of
  `bins` equal-width bins of the logit in [-LOGIT_RANGE, LOGIT_RANGE] (probabilities clamped to
  [1e-7, 1 - 1e-7], as logloss does); `compute()` sums the histograms over ranks with one all-reduce
  and reads the AUC off them: sum_b pos_b (neg_{<b} + neg_b / 2) / (P N), pairs weighted by the
  product of their weights. Two rows in the same bin count 1/2, as a tie does, so the result differs
  from the exact rank statistic by at most half the weight of the pairs that share a bin,
  sum_b pos_b neg_b / (2 P N) over the bins that saw more than one distinct score (the smallest and
  largest logit of every bin are kept: a bin of one score holds only true ties, which are exact). That
  bound is computed and returned as `auc_bound`; the tests check the error against the exact
  computation on data with and without ties, where it is below 1e-4 at the default 2^18 bins. Memory:
  K x 4 x bins float64 per rank (8 MiB per task), whatever the number of rows.
* logloss, NE, count, base rate: running sums, one all-reduce.
* UAUC: needs every row of a user together. Each rank keeps its own rows compactly (float32 scores,
  0/1 labels, float32 weight, int64 user: 4K + K + 12 bytes a row), and `compute()` sends every row to
  its user's owner rank (user id hash mod world) in one all-to-all; each rank computes the exact AUC of
  its users and two sums are all-reduced. A rank holds about 1/world of the rows, not all of them as
  an all-gather would. `users=False` skips it (no rows kept at all).

The same numbers on every rank; 2 ranks give what 1 rank gives on the same rows (up to float sums).
The exact all-gather path stays available as `metrics.auc.EvalAccumulator` (`metrics.eval_auc = "exact"`).

Legend: B batch rows, K tasks, N rows, Y histogram bins.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from metrics.auc import EvalAccumulator, _check_batch, _grouped_auc, _world

LOGIT_RANGE = 16.2
"""Half-width of the logit grid: logit(1 - 1e-7) = 16.12, so every clamped probability falls inside."""
DEFAULT_BINS = 2**18
_EPS = 1e-7


def histogram_auc(hist_2Y: Tensor, mixed_Y: Tensor | None = None) -> tuple[float, float]:
    """(AUC, bound on its error) from one task's class histograms.

    Args:
        hist_2Y: 2 x Y float64, row 0 the negatives' weight per bin, row 1 the positives', bins in
            increasing score order.
        mixed_Y: Y bools, whether a bin holds more than one distinct score (None: assume all do). Pairs
            in a bin of one score are true ties, counted 1/2 exactly: they do not enter the bound.

    Returns:
        (auc, bound): NaN, NaN when a class has no weight.
    """
    neg_Y, pos_Y = hist_2Y[0], hist_2Y[1]
    n, p = float(neg_Y.sum()), float(pos_Y.sum())
    if n <= 0 or p <= 0:
        return math.nan, math.nan
    below_Y = torch.cumsum(neg_Y, 0) - neg_Y  # negatives' weight strictly below each bin
    pairs = float((pos_Y * (below_Y + 0.5 * neg_Y)).sum())
    same_bin_Y = pos_Y * neg_Y
    if mixed_Y is not None:
        same_bin_Y = same_bin_Y * mixed_Y
    return pairs / (p * n), 0.5 * float(same_bin_Y.sum()) / (p * n)


class StreamingEvalAccumulator:
    """Eval metrics over all ranks in bounded memory; same interface as `metrics.auc.EvalAccumulator`.

    Example:
        acc = StreamingEvalAccumulator(["ctr", "cvr"], device)
        for batch in eval_loader:
            acc.update(torch.sigmoid(logits_BK), batch.labels, batch.user_ids, batch.weights)
        metrics = acc.compute()   # {"ctr": {"auc", "auc_bound", "uauc", "logloss", "ne", "count", "ctr"}, ...}

    Args:
        tasks: the K task names, in label-column order.
        device: where the histograms and sums live (the training device: NCCL reduces CUDA tensors).
        users: keep rows for UAUC (features.user_id set); False: UAUC is NaN and nothing grows.
        bins: Y, bins of the AUC grid (metrics.eval_auc_bins).
    """

    def __init__(self, tasks: list[str], device: torch.device, users: bool = True, bins: int = DEFAULT_BINS) -> None:
        if not tasks:
            raise ValueError("StreamingEvalAccumulator: `tasks` is empty; expected the task names (features.labels)")
        if bins < 2:
            raise ValueError(f"StreamingEvalAccumulator: bins must be >= 2 (metrics.eval_auc_bins), got {bins}")
        self.tasks, self.device, self.users, self.bins = list(tasks), device, users, bins
        self.reset()

    def reset(self) -> None:
        """Forget every row."""
        k = len(self.tasks)
        self._hist = torch.zeros(k * 2 * self.bins, dtype=torch.float64, device=self.device)  # (task, class, bin)
        # smallest and largest logit seen per (task, bin): a bin of one distinct score holds only true ties
        self._lo = torch.full((k * self.bins,), math.inf, dtype=torch.float64, device=self.device)
        self._hi = torch.full((k * self.bins,), -math.inf, dtype=torch.float64, device=self.device)
        # per task: sum w, sum w*y, sum w*ce; then the row count (weight > 0)
        self._sums = torch.zeros(3 * k + 1, dtype=torch.float64, device=self.device)
        self._rows: list[Tensor] = []  # each M x (2K + 1) float32: probs, labels, weight
        self._row_users: list[Tensor] = []  # each M int64

    def update(self, probs_BK: Tensor, labels_BK: Tensor, user_ids_B: Tensor, weights_B: Tensor) -> None:
        """Add one batch (no host sync: everything stays on the device).

        Args:
            probs_BK: B x K predicted probabilities.
            labels_BK: B x K labels in {0, 1} (> 0.5 counts as positive).
            user_ids_B: B int64 user ids.
            weights_B: B impression weights (0 = padding row: adds nothing).
        """
        _check_batch("StreamingEvalAccumulator.update", self.tasks, probs_BK, labels_BK, weights_B)
        k, r = len(self.tasks), self.bins
        p_BK = probs_BK.detach().to(self.device, torch.float64).clamp(_EPS, 1.0 - _EPS)
        y_BK = labels_BK.detach().to(self.device, torch.float64)
        w_B = weights_B.detach().to(self.device, torch.float64).clamp_min(0.0)
        pos_BK = (y_BK > 0.5).long()
        logit_BK = torch.logit(p_BK)
        bin_BK = ((logit_BK + LOGIT_RANGE) * (r / (2 * LOGIT_RANGE))).long().clamp_(0, r - 1)
        task_K = torch.arange(k, device=self.device)
        flat_BK = task_K * (2 * r) + pos_BK * r + bin_BK
        w_BK = w_B[:, None].expand_as(p_BK)
        self._hist.index_add_(0, flat_BK.reshape(-1), w_BK.reshape(-1))
        real_B1 = (w_B > 0)[:, None]  # padding rows (junk scores) must not widen a bin's range
        at_BK = (task_K * r + bin_BK).reshape(-1)
        self._lo.scatter_reduce_(0, at_BK, torch.where(real_B1, logit_BK, math.inf).reshape(-1), "amin")
        self._hi.scatter_reduce_(0, at_BK, torch.where(real_B1, logit_BK, -math.inf).reshape(-1), "amax")
        ce_BK = -(y_BK * torch.log(p_BK) + (1.0 - y_BK) * torch.log1p(-p_BK))
        self._sums[: 3 * k] += torch.cat([w_BK.sum(0), (w_BK * y_BK).sum(0), (w_BK * ce_BK).sum(0)])
        self._sums[3 * k] += (w_B > 0).sum()
        if self.users:
            keep = w_B > 0  # the rows are kept for UAUC anyway: filtering costs one sync, saves memory
            rows = torch.cat(
                [probs_BK.detach().float(), labels_BK.detach().float(), weights_B.detach().float()[:, None]], 1
            )
            self._rows.append(rows[keep.to(rows.device)])
            self._row_users.append(user_ids_B.detach().to(torch.int64)[keep.to(user_ids_B.device)])

    def memory_bytes(self) -> int:
        """Bytes this rank holds: histograms + sums + the rows kept for UAUC."""
        rows = sum(t.numel() * t.element_size() for t in self._rows + self._row_users)
        return (self._hist.numel() + self._lo.numel() + self._hi.numel() + self._sums.numel()) * 8 + rows

    def _uauc(self) -> list[float]:
        """UAUC per task: rows sent to their user's owner rank, exact per-user AUC there, two sums reduced."""
        k = len(self.tasks)
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, 2 * k + 1, device=self.device)
        users = torch.cat(self._row_users) if self._row_users else torch.zeros(0, dtype=torch.int64, device=self.device)
        rows, users = rows.to(self.device), users.to(self.device)
        world = _world()
        if world > 1:
            owner = _owner(users, world)
            order = torch.argsort(owner, stable=True)
            rows, users = rows[order], users[order]
            send = torch.bincount(owner, minlength=world)
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send)
            s, rc = send.tolist(), recv.tolist()
            rows_in = rows.new_empty(sum(rc), rows.shape[1])
            users_in = users.new_empty(sum(rc))
            dist.all_to_all_single(rows_in, rows.contiguous(), rc, s)
            dist.all_to_all_single(users_in, users.contiguous(), rc, s)
            rows, users = rows_in, users_in
        sums = torch.zeros(2 * k, dtype=torch.float64, device=self.device)
        for i in range(k):
            auc_G, imp_G = _grouped_auc(rows[:, i], rows[:, k + i], rows[:, 2 * k], users)
            valid = ~torch.isnan(auc_G)
            sums[2 * i] = (auc_G[valid] * imp_G[valid]).sum()
            sums[2 * i + 1] = imp_G[valid].sum()
        if world > 1:
            dist.all_reduce(sums)
        return [float(sums[2 * i] / sums[2 * i + 1]) if sums[2 * i + 1] > 0 else math.nan for i in range(k)]

    def compute(self) -> dict[str, dict[str, float]]:
        """Reduce over ranks (collective when a process group is up) and compute the metrics.

        Returns:
            {task: {"auc", "auc_bound", "uauc", "logloss", "ne", "count", "ctr"}}, identical on every rank.
        """
        k, r = len(self.tasks), self.bins
        hist, sums, lo, hi = self._hist.clone(), self._sums.clone(), self._lo.clone(), self._hi.clone()
        if _world() > 1:
            dist.all_reduce(hist)
            dist.all_reduce(sums)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        mixed_KY = (lo < hi).view(k, r)
        uauc = self._uauc() if self.users else [math.nan] * k
        hist_K2Y = hist.view(k, 2, r)
        s = sums.tolist()
        out: dict[str, dict[str, float]] = {}
        for i, task in enumerate(self.tasks):
            w, wy, wce = s[i], s[k + i], s[2 * k + i]
            a, bound = histogram_auc(hist_K2Y[i], mixed_KY[i])
            rate = wy / w if w > 0 else math.nan
            ll = wce / w if w > 0 else math.nan
            ent = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else math.nan
            out[task] = {
                "auc": a,
                "auc_bound": bound,
                "uauc": uauc[i],
                "logloss": ll,
                "ne": ll / ent if ent == ent else math.nan,
                "count": int(s[3 * k]),
                "ctr": rate,
            }
        return out


def _owner(users_N: Tensor, world: int) -> Tensor:
    """The rank that owns each user: a multiplicative hash of the id mod world (ids need not be spread)."""
    h = (users_N * -7046029254386353131) >> 17  # 0x9E3779B97F4A7C15 as int64; arithmetic shift mixes the bits
    return torch.remainder(h, world)


def eval_accumulator(
    tasks: list[str], device: torch.device, users: bool, mode: str = "histogram", bins: int = DEFAULT_BINS
) -> StreamingEvalAccumulator | EvalAccumulator:
    """The evaluation accumulator `metrics.eval_auc` names: 'histogram' (bounded memory) or 'exact'."""
    if mode == "histogram":
        return StreamingEvalAccumulator(tasks, device, users=users, bins=bins)
    if mode == "exact":
        return EvalAccumulator(tasks, device=device, users=users)
    raise ValueError(f"metrics.eval_auc = {mode!r}; expected 'histogram' or 'exact'")
