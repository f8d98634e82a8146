"""Per-feature statistics of the dense columns: one streaming pass over the training Parquet.

    stats = dense_stats(plan, ["age", "fnlwgt"], settings, rank=r, world_size=w, gather=all_gather_object)
    stats["fnlwgt"].mean, .std, .min, .max, .missing_rate, .skew, .quantiles["0.5"], .bucket_edges

Each rank reads only the dense columns of its share of the row groups (units r, r + w, ...), one row
group at a time: memory is one row group's dense columns plus, per feature, at most MAX_DISTINCT
(value, count) pairs. Partial results are gathered in rank order and merged, so every rank gets the
same statistics, equal for any world size.

What is computed per feature (missing = null, NaN or +-inf; every statistic is over the other values):
- count, missing, min, max; mean, std and skewness of the raw values, of log1p(x) (sign-symmetric:
  sign(x) log1p(|x|)) and of the values clipped at the `clip_quantile` / 1 - `clip_quantile` quantiles;
- quantiles at QUANTILE_LEVELS, and `num_buckets` - 1 bucket edges: one bucket per distinct value when a
  feature has at most `num_buckets` distinct values (ages, counts, codes: each value keeps its own
  embedding; the edges are the midpoints between consecutive values), else equal-frequency edges (the
  `k / num_buckets` quantiles). Edges are padded with +inf to a fixed count, so shapes never depend on
  the data.
Quantiles are exact (numpy's 'linear' definition) while a feature has at most MAX_DISTINCT distinct
values (integer columns, categorical-like floats); beyond that a second pass histograms the feature on
the asinh scale in HIST_BINS bins between its min and max, and every quantile is then within one bin (on
that scale) of the order statistics the exact quantile interpolates between (`exact: false`). Moments
are float64 sums merged with Chan's formulas (exact up to float64 rounding).

Legend: n rows of a row group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.derived import add_derived, physical_columns
from pipeline.errors import DataError
from pipeline.plan import DatasetPlan

STATS_VERSION = 2
QUANTILE_LEVELS = (0.0, 0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999, 1.0)
MAX_DISTINCT = 1 << 16
HIST_BINS = 1 << 14

Gather = Callable[[object], list[object]]
"""Collects one picklable object from every rank, in rank order (all_gather_object); identity-like for 1 rank."""


@dataclass
class Moments:
    """Count, mean and the 2nd / 3rd central moment sums of a stream, mergeable (Chan et al.)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0

    @staticmethod
    def of(x: np.ndarray) -> Moments:
        if x.size == 0:
            return Moments()
        x = x.astype(np.float64, copy=False)
        mean = float(x.mean())
        d = x - mean
        return Moments(int(x.size), mean, float(np.dot(d, d)), float(np.dot(d * d, d)))

    def merge(self, o: Moments) -> Moments:
        if o.n == 0:
            return self
        if self.n == 0:
            return o
        n = self.n + o.n
        delta = o.mean - self.mean
        mean = self.mean + delta * o.n / n
        m2 = self.m2 + o.m2 + delta * delta * self.n * o.n / n
        m3 = (
            self.m3
            + o.m3
            + delta**3 * self.n * o.n * (self.n - o.n) / (n * n)
            + 3.0 * delta * (self.n * o.m2 - o.n * self.m2) / n
        )
        return Moments(n, mean, m2, m3)

    def std(self) -> float:
        """Population standard deviation (numpy's default, ddof 0)."""
        return math.sqrt(self.m2 / self.n) if self.n else 0.0

    def skew(self) -> float:
        """Fisher-Pearson skewness g1 = m3 / m2^1.5 (0 for a constant)."""
        if self.n == 0 or self.m2 <= 0:
            return 0.0
        return (self.m3 / self.n) / (self.m2 / self.n) ** 1.5


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """sign(x) log1p(|x|): log1p for non-negative values, mirrored for negative ones (the model's log1p)."""
    return np.sign(x) * np.log1p(np.abs(x))


@dataclass
class _Partial:
    """One rank's running statistics of one feature."""

    raw: Moments = field(default_factory=Moments)
    log: Moments = field(default_factory=Moments)
    missing: int = 0
    lo: float = math.inf
    hi: float = -math.inf
    values: np.ndarray | None = field(default_factory=lambda: np.zeros(0))
    counts: np.ndarray | None = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def add(self, x: np.ndarray, missing: int) -> None:
        self.missing += missing
        if x.size == 0:
            return
        self.raw = self.raw.merge(Moments.of(x))
        self.log = self.log.merge(Moments.of(signed_log1p(x)))
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        if self.values is not None:
            v, c = np.unique(x, return_counts=True)
            self._add_counts(v, c)

    def _add_counts(self, v: np.ndarray, c: np.ndarray) -> None:
        assert self.values is not None and self.counts is not None
        allv = np.concatenate([self.values, v])
        allc = np.concatenate([self.counts, c])
        uniq, inv = np.unique(allv, return_inverse=True)
        if uniq.size > MAX_DISTINCT:
            self.values = self.counts = None  # too many distinct values: quantiles from a histogram
            return
        self.values, self.counts = uniq, np.bincount(inv, weights=allc).astype(np.int64)

    def merge(self, o: _Partial) -> _Partial:
        out = _Partial(self.raw.merge(o.raw), self.log.merge(o.log), self.missing + o.missing)
        out.lo, out.hi = min(self.lo, o.lo), max(self.hi, o.hi)
        if self.values is None or o.values is None:
            out.values = out.counts = None
        else:
            out.values, out.counts = self.values, self.counts
            out._add_counts(o.values, o.counts)  # type: ignore[arg-type]
        return out


@dataclass
class DenseFeatureStats:
    """The statistics of one dense feature over the training rows (see the module docstring)."""

    name: str
    count: int
    missing: int
    min: float
    max: float
    mean: float
    std: float
    skew: float
    log_mean: float
    log_std: float
    clip_lo: float
    clip_hi: float
    clip_mean: float
    clip_std: float
    quantiles: dict[str, float]
    bucket_edges: list[float]
    exact: bool
    """Whether the quantiles are exact (<= MAX_DISTINCT distinct values) or within one histogram bin."""
    distinct: int | None = None
    """Distinct finite values (None: more than MAX_DISTINCT)."""

    @property
    def missing_rate(self) -> float:
        total = self.count + self.missing
        return self.missing / total if total else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "missing_rate": self.missing_rate}

    @staticmethod
    def from_dict(d: dict) -> DenseFeatureStats:
        return DenseFeatureStats(**{k: v for k, v in d.items() if k != "missing_rate"})


@dataclass(frozen=True)
class StatsSettings:
    """What the derived statistics depend on besides the data (part of the cache key)."""

    num_buckets: int = 128
    clip_quantile: float = 0.001


def _quantiles_exact(values: np.ndarray, counts: np.ndarray, levels: list[float]) -> list[float]:
    """numpy.quantile(method='linear') of the multiset {values[i] x counts[i]} at each level."""
    n = int(counts.sum())
    cum = np.cumsum(counts)  # value j holds sorted positions [cum[j] - counts[j], cum[j])
    out = []
    for q in levels:
        h = (n - 1) * q
        lo, hi = math.floor(h), math.ceil(h)
        v_lo = float(values[np.searchsorted(cum, lo, side="right")])
        v_hi = float(values[np.searchsorted(cum, hi, side="right")])
        out.append(v_lo + (h - lo) * (v_hi - v_lo))
    return out


def _quantiles_hist(hist: np.ndarray, t_lo: float, t_hi: float, levels: list[float]) -> list[float]:
    """Quantiles of a histogram on the asinh scale (bins between t_lo and t_hi), interpolated within a bin."""
    n = int(hist.sum())
    cum = np.cumsum(hist)
    width = (t_hi - t_lo) / len(hist)
    out = []
    for q in levels:
        r = q * (n - 1)  # 0-based position of the quantile among the n sorted values
        b = int(min(np.searchsorted(cum, r, side="right"), len(hist) - 1))
        before = cum[b] - hist[b]
        frac = (r - before + 0.5) / hist[b] if hist[b] else 0.5
        out.append(float(np.sinh(t_lo + (b + min(max(frac, 0.0), 1.0)) * width)))
    return out


def _bucket_edges(values: np.ndarray | None, quantile_edges: list[float], num_buckets: int) -> list[float]:
    """num_buckets - 1 edges: midpoints between the distinct values when there are few enough, else the
    equal-frequency quantiles; +inf pads (searchsorted never passes them)."""
    if values is not None and len(values) <= num_buckets:
        mids = ((values[1:] + values[:-1]) / 2.0).tolist()
        return mids + [math.inf] * (num_buckets - 1 - len(mids))
    return list(quantile_edges)


def _clipped_moments(values: np.ndarray, weights: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    x = np.clip(values, lo, hi)
    w = weights.astype(np.float64)
    mean = float(np.dot(w, x) / w.sum())
    return mean, math.sqrt(float(np.dot(w, (x - mean) ** 2) / w.sum()))


def _hist_edges(lo: float, hi: float) -> tuple[float, float]:
    t_lo, t_hi = float(np.arcsinh(lo)), float(np.arcsinh(hi))
    return t_lo, (t_hi if t_hi > t_lo else t_lo + 1.0)


def read_columns(plan: DatasetPlan, names: list[str], units: list[int]) -> Iterator[pa.Table]:
    """The columns `names` of each unit's rows, one row group at a time (file order); derived names
    (`pipeline.derived`, e.g. 'len(hist_items)') are computed from their source columns."""
    columns = physical_columns(names)
    by_file: dict[int, list[int]] = {}
    for i in units:
        by_file.setdefault(plan.units[i].file_index, []).append(i)
    for fi, idx in sorted(by_file.items()):
        path = plan.files[fi]
        with plan.filesystem.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for i in idx:
                u = plan.units[i]
                try:
                    t = pf.read_row_group(u.row_group, columns=columns).slice(u.start, u.num_rows)
                except (OSError, pa.ArrowException) as e:
                    raise DataError(f"{path}: row group {u.row_group}: {str(e).splitlines()[0]}") from None
                yield add_derived(t, names)


def _finite(col: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """The finite values of a column as float64, and how many were null / NaN / inf."""
    x = col.to_numpy(zero_copy_only=False)
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    return x[ok], int(x.size - ok.sum())


def dense_stats(
    plan: DatasetPlan,
    names: list[str],
    settings: StatsSettings,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
) -> dict[str, DenseFeatureStats]:
    """Statistics of the dense columns `names` over every row of `plan` (collective when world_size > 1).

    Args:
        plan: the training rows (the validation carve already taken out).
        names: dense column names.
        settings: bucket count and clip quantile of the derived statistics.
        rank, world_size: this rank's share is units rank, rank + world_size, ...
        gather: all_gather_object over the ranks (required when world_size > 1).

    Returns:
        {name: DenseFeatureStats}, identical on every rank.

    Raises:
        DataError: a column has no finite value at all, or a row group cannot be read (names the file).
    """
    if world_size > 1 and gather is None:
        raise ValueError("dense_stats: world_size > 1 needs a gather function (all_gather_object)")
    gather = gather or (lambda obj: [obj])
    mine = list(range(rank, len(plan.units), world_size))
    parts = {n: _Partial() for n in names}
    for table in read_columns(plan, names, mine):
        for name in names:
            x, missing = _finite(table.column(name))
            parts[name].add(x, missing)
    merged: dict[str, _Partial] = {}
    for rank_parts in gather(parts):
        for name, p in rank_parts.items():  # type: ignore[attr-defined]
            merged[name] = merged[name].merge(p) if name in merged else p
    need_hist = [n for n in names if merged[n].values is None]
    hists: dict[str, np.ndarray] = {}
    if need_hist:  # second pass: histograms on the asinh scale between the (global) min and max
        local = {n: np.zeros(HIST_BINS, dtype=np.int64) for n in need_hist}
        for table in read_columns(plan, need_hist, mine):
            for name in need_hist:
                x, _ = _finite(table.column(name))
                t_lo, t_hi = _hist_edges(merged[name].lo, merged[name].hi)
                b = np.clip(((np.arcsinh(x) - t_lo) / (t_hi - t_lo) * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
                local[name] += np.bincount(b, minlength=HIST_BINS)
        for rank_hists in gather(local):
            for name, h in rank_hists.items():  # type: ignore[attr-defined]
                hists[name] = hists[name] + h if name in hists else h
    return {n: _finish(n, merged[n], hists.get(n), settings) for n in names}


def _finish(name: str, p: _Partial, hist: np.ndarray | None, s: StatsSettings) -> DenseFeatureStats:
    if p.raw.n == 0:
        raise DataError(f"dense feature '{name}': no finite value in the training data (all null / NaN / inf)")
    levels = [
        *QUANTILE_LEVELS,
        s.clip_quantile,
        1.0 - s.clip_quantile,
        *(k / s.num_buckets for k in range(1, s.num_buckets)),
    ]
    if p.values is not None:
        qs = _quantiles_exact(p.values, p.counts, levels)  # type: ignore[arg-type]
        values, weights = p.values, p.counts
    else:
        assert hist is not None
        t_lo, t_hi = _hist_edges(p.lo, p.hi)
        qs = _quantiles_hist(hist, t_lo, t_hi, levels)
        centres = np.sinh(t_lo + (np.arange(HIST_BINS) + 0.5) * (t_hi - t_lo) / HIST_BINS)
        values, weights = centres[hist > 0], hist[hist > 0]
    n_q = len(QUANTILE_LEVELS)
    clip_lo, clip_hi = qs[n_q], qs[n_q + 1]
    clip_mean, clip_std = _clipped_moments(values, weights, clip_lo, clip_hi)  # type: ignore[arg-type]
    return DenseFeatureStats(
        name=name,
        count=p.raw.n,
        missing=p.missing,
        min=p.lo,
        max=p.hi,
        mean=p.raw.mean,
        std=p.raw.std(),
        skew=p.raw.skew(),
        log_mean=p.log.mean,
        log_std=p.log.std(),
        clip_lo=clip_lo,
        clip_hi=clip_hi,
        clip_mean=clip_mean,
        clip_std=clip_std,
        quantiles={f"{q:g}": v for q, v in zip(QUANTILE_LEVELS, qs[:n_q])},
        bucket_edges=_bucket_edges(p.values, qs[n_q + 2 :], s.num_buckets),
        exact=p.values is not None,
        distinct=len(p.values) if p.values is not None else None,
    )
