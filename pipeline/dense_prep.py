"""Dense feature preprocessing as a pipeline stage: statistics (cached), the transform of each feature.

    stats, reused = load_or_compute_stats(plan, features, cache, rank=r, world_size=w, gather=g, broadcast=b)
    choices = resolve(features, stats)     # one DenseChoice per features.dense column
    model_buffers(choices)                 # the numbers model.dense_input.DenseInput.set_stats takes

Each name of `features.dense_transform` / `dense_transforms` (pipeline.config.DENSE_TRANSFORMS) is
turned here into numbers the model applies (sign-log1p flag, clip bounds, mean, std, bucket edges):

    standardize   (x - mean) / std
    log1p         sign(x) log1p(|x|), then standardized with the mean / std of that
    clip          clipped to [q, 1 - q] quantiles (q = dense_clip_quantile), standardized with the clipped moments
    bucketize     dense_buckets equal-frequency buckets (edges = training quantiles), bucket 0 for missing
    none          raw values
    auto          'bucketize' for a feature with at most dense_buckets distinct values (ages, counts, codes:
                  one embedding per value), else 'log1p' for a heavy-tailed non-negative feature (min >= 0
                  and skewness > AUTO_SKEW), else 'standardize'

The statistics are computed once over the training rows (the validation carve excluded) and cached in
the run directory under a key of the data (files, sizes, row groups), the columns and the settings, so
a restart reuses them; the chosen transforms are written next to them and printed in the run log.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import FeaturesConfig
from pipeline.dense_stats import STATS_VERSION, DenseFeatureStats, Gather, StatsSettings, dense_stats
from pipeline.plan import DatasetPlan

AUTO_SKEW = 2.0
"""'auto' takes log1p when a non-negative feature's skewness is above this (capital gains, counts, prices)."""
STATS_FILE = "dense_stats.json"
CHOICES_FILE = "dense_preprocess.json"

Broadcast = Callable[[object], object]
"""Rank 0's object on every rank (broadcast_object); identity for 1 rank."""


@dataclass
class DenseChoice:
    """The resolved transform of one dense feature and the numbers the model applies."""

    name: str
    transform: str
    """'standardize', 'log1p', 'clip', 'bucketize' or 'none' ('auto' resolved)."""
    reason: str
    log1p: bool
    clip_lo: float
    clip_hi: float
    mean: float
    std: float
    edges: list[float]
    """Bucket edges ('bucketize' only)."""


def settings_of(features: FeaturesConfig) -> StatsSettings:
    return StatsSettings(num_buckets=features.dense_buckets, clip_quantile=features.dense_clip_quantile)


def resolve(features: FeaturesConfig, stats: dict[str, DenseFeatureStats]) -> list[DenseChoice]:
    """One DenseChoice per `features.dense` column, in order."""
    out = []
    for name in features.dense:
        s, kind = stats[name], features.dense_transform_of(name)
        reason = "configured"
        if kind == "auto":
            heavy = s.min >= 0 and s.skew > AUTO_SKEW
            if s.distinct is not None and s.distinct <= features.dense_buckets:
                kind = "bucketize"
                reason = f"auto: {s.distinct} distinct values <= dense_buckets {features.dense_buckets}"
            elif heavy:
                kind, reason = "log1p", f"auto: min {s.min:g} >= 0, skew {s.skew:.2f} > {AUTO_SKEW:g}"
            else:
                kind, reason = "standardize", f"auto: min {s.min:g}, skew {s.skew:.2f}, many distinct values"
        inf = math.inf
        if kind == "log1p":
            c = DenseChoice(name, kind, reason, True, -inf, inf, s.log_mean, s.log_std, [])
        elif kind == "clip":
            c = DenseChoice(name, kind, reason, False, s.clip_lo, s.clip_hi, s.clip_mean, s.clip_std, [])
        elif kind == "standardize":
            c = DenseChoice(name, kind, reason, False, -inf, inf, s.mean, s.std, [])
        elif kind == "bucketize":
            c = DenseChoice(name, kind, reason, False, -inf, inf, 0.0, 1.0, list(s.bucket_edges))
        elif kind == "none":
            c = DenseChoice(name, kind, reason, False, -inf, inf, 0.0, 1.0, [])
        else:
            raise ValueError(f"features.dense_transform(s) for {name!r}: unknown transform {kind!r}")
        out.append(c)
    return out


def model_buffers(choices: list[DenseChoice]) -> dict[str, list]:
    """Keyword arguments of `DenseInput.set_stats`: per feature values, and the edges of bucketized ones."""
    return {
        "log1p": [c.log1p for c in choices],
        "clip_lo": [c.clip_lo for c in choices],
        "clip_hi": [c.clip_hi for c in choices],
        "mean": [c.mean for c in choices],
        "std": [c.std for c in choices],
        "edges": [c.edges for c in choices if c.transform == "bucketize"],
    }


def stats_key(plan: DatasetPlan, features: FeaturesConfig) -> str:
    """A key of everything the statistics depend on: files (path, size, modification time), row groups and
    row ranges, the dense columns and the settings."""
    return plan.content_key(STATS_VERSION, list(features.dense), asdict(settings_of(features)))


def load_or_compute_stats(
    plan: DatasetPlan,
    features: FeaturesConfig,
    cache: Path | None,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
    broadcast: Broadcast | None = None,
) -> tuple[dict[str, DenseFeatureStats], bool]:
    """Statistics of `features.dense` over `plan` (collective), from `cache` when its key matches.

    Rank 0 reads the cache and tells every rank whether it holds; on a miss all ranks compute their
    share and rank 0 writes the cache. Returns (stats, whether the cache was reused).
    """
    key = stats_key(plan, features)
    hit = None
    if rank == 0 and cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                hit = data["features"]
        except (OSError, ValueError, KeyError):
            hit = None  # an unreadable cache is recomputed, never trusted
    if world_size > 1:
        assert broadcast is not None, "load_or_compute_stats: world_size > 1 needs broadcast"
        hit = broadcast(hit)
    if hit is not None:
        return {n: DenseFeatureStats.from_dict(hit[n]) for n in features.dense}, True
    stats = dense_stats(
        plan, list(features.dense), settings_of(features), rank=rank, world_size=world_size, gather=gather
    )
    if rank == 0 and cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"key": key, "features": {n: s.to_dict() for n, s in stats.items()}}, indent=1) + "\n"
        )
        tmp.replace(cache)
    return stats, False


def report(choices: list[DenseChoice], stats: dict[str, DenseFeatureStats]) -> str:
    """The table the run log prints: per feature, its statistics and the transform chosen (and why)."""
    lines = [f"{'dense feature':<18}{'transform':<12}{'missing':>9}{'mean':>12}{'std':>12}{'min':>12}{'max':>12}  why"]
    for c in choices:
        s = stats[c.name]
        lines.append(
            f"{c.name:<18}{c.transform:<12}{s.missing_rate:>9.2%}{s.mean:>12.4g}{s.std:>12.4g}{s.min:>12.4g}"
            f"{s.max:>12.4g}  {c.reason}"
        )
    return "\n".join(lines)


def write_choices(path: Path, choices: list[DenseChoice], stats: dict[str, DenseFeatureStats]) -> None:
    """<run>/dense_preprocess.json: per feature the transform, its numbers and the statistics behind them."""
    rows = {c.name: {**asdict(c), "stats": stats[c.name].to_dict()} for c in choices}
    path.write_text(json.dumps(rows, indent=1, default=str) + "\n")
