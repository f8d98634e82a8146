"""Trivial baselines that every evaluation report carries: a model that loses to them is worse than trivial.

    prior = fit_priors(train_plan, features, rank=r, world_size=w, gather=all_gather_object)   # training rows
    scores = score_baselines(prior, eval_plan, features, device, rank=r, world_size=w)         # collective
    below = below_prior(model_metrics, scores)      # one line per task whose model AUC is below a prior

Baselines (fit on the training rows, the validation carve excluded, scored on the evaluated rows):

    global_prior   every row scored with the training positive rate p0_k of task k (AUC 0.5; its logloss
                   is the label entropy, what NE divides by)
    popularity     the candidate item's number of training rows (`features.item_id`): the popularity
                   prior; unseen items count 0 (AUC only: a count is not a probability)
    item_positives the item's number of positive training rows per task (its click count; AUC only)
    item_ctr       the item's smoothed training positive rate (pos_ik + m p0_k) / (n_i + m), m = PRIOR_ROWS
                   pseudo-rows; unseen items get p0_k

Item counts are exact up to `features.vocab_exact_ids` distinct items per rank (beyond it each rank keeps
the most frequent ones, so the rarest items read as unseen). Scores go through the same evaluation
accumulator as the model (`metrics.eval_auc`), each rank reading its share of the row groups.

Legend: N rows (of a row group), K tasks, G items.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from metrics.streaming import eval_accumulator
from pipeline.config import FeaturesConfig
from pipeline.dense_stats import read_columns
from pipeline.ids import hash_strings, sum_by_id
from pipeline.plan import DatasetPlan

PRIOR_ROWS = 10.0
"""Pseudo-rows of the global rate in the item_ctr baseline's smoothing."""
BASELINES = ("global_prior", "popularity", "item_positives", "item_ctr")
COUNT_BASELINES = ("popularity", "item_positives")
"""Baselines whose score is a count: AUC only."""
UNSEEN = np.int64(np.iinfo(np.int64).min)
"""The id a null item reads as (never a real id in practice: it stays unseen)."""

Gather = Callable[[object], list[object]]


def _item_ids(col: pa.ChunkedArray) -> np.ndarray:
    """int64 item ids of a column (strings hashed as the pipeline hashes them; nulls -> UNSEEN)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_binary(arr.type):
        ids, valid = hash_strings(arr)
        ids[~valid] = UNSEEN
        return ids
    out = np.asarray(arr.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    if arr.null_count:
        out[~np.asarray(arr.is_valid())] = UNSEEN
    return out


def _labels(table: pa.Table, labels: list[str]) -> np.ndarray:
    """N x K float64 labels (validity is the loader's job: it refuses anything but 0 / 1)."""
    return np.stack([np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float64) for c in labels], 1)


@dataclass
class Priors:
    """What the baselines know from the training rows.

    Args:
        rows: training rows; positives_K: their positive count per task.
        items: G sorted item ids; item_rows: G training rows each; item_pos_GK: G x K positives each
        (empty without `features.item_id`).
    """

    rows: int
    positives_K: np.ndarray
    items: np.ndarray
    item_rows: np.ndarray
    item_pos_GK: np.ndarray

    @property
    def rate_K(self) -> np.ndarray:
        return self.positives_K / max(self.rows, 1)

    def scores(self, item_N: np.ndarray | None, n: int) -> dict[str, np.ndarray]:
        """{baseline: N x K probabilities} of n rows with these item ids (None: no item baselines)."""
        k = len(self.positives_K)
        p0 = np.clip(self.rate_K, 1e-6, 1 - 1e-6)
        out = {"global_prior": np.broadcast_to(p0, (n, k)).copy()}
        if item_N is None or len(self.items) == 0:
            return out
        pos = np.minimum(np.searchsorted(self.items, item_N), len(self.items) - 1)
        seen = self.items[pos] == item_N
        count_N = np.where(seen, self.item_rows[pos], 0).astype(np.float64)
        # a monotone map of the count into (0, 1) for the shared accumulator: only its ranking matters
        pop = 1.0 / (1.0 + np.exp(-(np.log1p(count_N) - 8.0)))
        out["popularity"] = np.repeat(pop[:, None], k, 1)
        pos_NK = np.where(seen[:, None], self.item_pos_GK[pos], 0.0)
        out["item_positives"] = 1.0 / (1.0 + np.exp(-(np.log1p(pos_NK) - 8.0)))
        out["item_ctr"] = (pos_NK + PRIOR_ROWS * p0) / (count_N[:, None] + PRIOR_ROWS)
        return out


def _merge(
    items: np.ndarray, sums_GV: np.ndarray, ids_N: np.ndarray, vals_NV: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-item sums (column 0: rows, then positives per task) with more rows added, cut to the `limit`
    most frequent items (ties: smaller id)."""
    u, sums = sum_by_id(np.concatenate([items, ids_N]), np.concatenate([sums_GV, vals_NV]))
    if len(u) > limit:  # bounded
        keep = np.sort(np.lexsort((u, -sums[:, 0]))[:limit])
        u, sums = u[keep], sums[keep]
    return u, sums


def _local_counts(
    plan: DatasetPlan, features: FeaturesConfig, units: list[int]
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, positives_K, items G, per-item sums G x (1 + K): rows, positives) of this rank's units."""
    k, limit = len(features.labels), features.vocab_exact_ids
    rows, pos_K = 0, np.zeros(k)
    items, sums = np.zeros(0, np.int64), np.zeros((0, 1 + k))
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    cols = [*features.labels, *([features.item_id] if features.item_id else [])]
    for table in read_columns(plan, list(dict.fromkeys(cols)), units):
        y_NK = _labels(table, features.labels)
        rows += len(y_NK)
        pos_K += y_NK.sum(0)
        if features.item_id:
            pending.append((_item_ids(table.column(features.item_id)), np.hstack([np.ones((len(y_NK), 1)), y_NK])))
            if sum(len(p[0]) for p in pending) >= max(len(items), 1 << 16):  # amortised merges
                items, sums = _merge(items, sums, *(np.concatenate(c) for c in zip(*pending)), limit)
                pending = []
    if pending:
        items, sums = _merge(items, sums, *(np.concatenate(c) for c in zip(*pending)), limit)
    return rows, pos_K, items, sums


def fit_priors(
    plan: DatasetPlan, features: FeaturesConfig, *, rank: int = 0, world_size: int = 1, gather: Gather | None = None
) -> Priors:
    """The baselines' statistics over every row of `plan` (collective when world_size > 1)."""
    gather = gather or (lambda obj: [obj])
    parts = gather(_local_counts(plan, features, list(range(rank, len(plan.units), world_size))))
    rows = sum(int(p[0]) for p in parts)  # type: ignore[index]
    pos_K = np.sum([p[1] for p in parts], axis=0)  # type: ignore[index]
    u, sums = sum_by_id(np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]))  # type: ignore[index]
    return Priors(rows, pos_K, u, sums[:, 0].astype(np.int64), sums[:, 1:])


def score_baselines(
    priors: Priors,
    plan: DatasetPlan,
    features: FeaturesConfig,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    mode: str = "histogram",
    bins: int = 2**18,
) -> dict[str, dict[str, dict[str, float]]]:
    """{baseline: {task: {auc, logloss, ...}}} of `plan`'s rows (collective: every rank calls it; each
    reads its share of the row groups). The count baselines report AUC only."""
    tasks = list(features.labels)
    names = [b for b in BASELINES if b == "global_prior" or features.item_id]
    accs = {b: eval_accumulator(tasks, device, False, mode, bins) for b in names}
    cols = [*features.labels, *([features.item_id] if features.item_id else [])]
    for table in read_columns(plan, list(dict.fromkeys(cols)), list(range(rank, len(plan.units), world_size))):
        y_NK = torch.from_numpy(_labels(table, tasks)).to(device)
        item = _item_ids(table.column(features.item_id)) if features.item_id else None
        n = len(y_NK)
        for b, s_NK in priors.scores(item, n).items():
            accs[b].update(torch.from_numpy(s_NK).to(device), y_NK, torch.zeros(n, dtype=torch.int64, device=device),
                           torch.ones(n, dtype=torch.float64, device=device))  # fmt: skip
    out = {}
    for b, acc in accs.items():
        m = acc.compute()
        keep = ("auc", "auc_bound") if b in COUNT_BASELINES else ("auc", "auc_bound", "logloss", "ne")
        out[b] = {t: {key: v[key] for key in keep if key in v} for t, v in m.items()}
    return out


def below_prior(metrics: dict[str, dict[str, float]], baselines: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """One line per task whose model AUC is below the best item prior (popularity, item_positives or
    item_ctr); [] when the model beats them (or there are none)."""
    lines = []
    for task, m in metrics.items():
        priors = [(b, baselines[b][task]["auc"]) for b in BASELINES[1:] if b in baselines and task in baselines[b]]
        if not priors or "auc" not in m:
            continue
        name, best = max(priors, key=lambda p: p[1])
        if m["auc"] < best:
            lines.append(
                f"WARNING: {task} AUC {m['auc']:.4f} is below the {name} baseline's {best:.4f}: the model ranks "
                "worse than a per-item statistic of the training rows"
            )
    return lines


def baseline_report(
    train: DatasetPlan,
    splits: dict[str, DatasetPlan | None],
    features: FeaturesConfig,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
    mode: str = "histogram",
    bins: int = 2**18,
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{split: {baseline: {task: metrics}}} for every split that has a plan, the priors fit on `train`
    (collective)."""
    priors = fit_priors(train, features, rank=rank, world_size=world_size, gather=gather)
    return {
        name: score_baselines(priors, plan, features, device, rank=rank, world_size=world_size, mode=mode, bins=bins)
        for name, plan in splits.items()
        if plan is not None
    }


def format_baselines(model: dict[str, dict[str, float]], baselines: dict[str, dict[str, dict[str, float]]]) -> str:
    """The lines the run log prints under the eval table: per task, the model's AUC next to each baseline's."""
    lines = []
    for task, m in model.items():
        parts = [f"model {m['auc']:.4f}"] + [f"{b} {v[task]['auc']:.4f}" for b, v in baselines.items() if task in v]
        lines.append(f"[baselines] {task} AUC: " + ", ".join(parts))
    return "\n".join(lines)
