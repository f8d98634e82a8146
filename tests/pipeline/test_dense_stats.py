"""Dense-feature statistics (exact against numpy, 1 and 2 ranks, bounded memory, the cache) and the
transforms they turn into (resolution, the model's DenseInput)."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.config import DenseInputSpec
from model.dense_input import DenseInput
from pipeline import dense_prep
from pipeline.config import DataConfig, FeaturesConfig
from pipeline.dense_stats import MAX_DISTINCT, QUANTILE_LEVELS, StatsSettings, dense_stats, signed_log1p
from pipeline.plan import carve_tail, plan_dataset

N_FILES, ROWS, RG = 3, 3000, 700


def _columns(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = N_FILES * ROWS
    gain = np.where(rng.random(n) < 0.9, 0, rng.choice([114, 2174, 7298, 15024, 99999], n)).astype(np.int64)
    cont = rng.lognormal(3.0, 1.2, n)  # heavy-tailed, > MAX_DISTINCT distinct values when n is large
    cont[::37] = np.nan
    return {"age": rng.integers(17, 91, n), "gain": gain, "cont": cont, "neg": rng.normal(-1.0, 2.0, n)}


def _write(root: Path, cols: dict[str, np.ndarray]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(N_FILES):
        part = {k: v[i * ROWS : (i + 1) * ROWS] for k, v in cols.items()}
        table = pa.table({"label": pa.array(np.arange(ROWS) % 2), **{k: pa.array(v) for k, v in part.items()}})
        pq.write_table(table, root / f"part-{i}.parquet", row_group_size=RG)
    return str(root)


def _plan(root: str, dense: list[str]):
    features = FeaturesConfig(labels=["label"], user_id="", dense=dense, sparse=[])
    return plan_dataset(root, DataConfig(row_id_column=""), features), features


def _numpy_reference(x: np.ndarray) -> dict[str, float]:
    x = x[np.isfinite(x)].astype(np.float64)
    d = x - x.mean()
    lx = signed_log1p(x)
    return {
        "count": x.size, "mean": x.mean(), "std": x.std(), "min": x.min(), "max": x.max(),
        "skew": (d**3).mean() / (d**2).mean() ** 1.5, "log_mean": lx.mean(), "log_std": lx.std(),
    }  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    cols = _columns()
    return _write(tmp_path_factory.mktemp("dense") / "ds", cols), cols


def test_statistics_equal_numpy(data) -> None:
    root, cols = data
    plan, _ = _plan(root, list(cols))
    stats = dense_stats(plan, list(cols), StatsSettings(num_buckets=8, clip_quantile=0.01))
    for name, x in cols.items():
        s, ref = stats[name], _numpy_reference(x)
        assert s.count == ref["count"] and s.missing == int((~np.isfinite(x)).sum())
        for key in ("mean", "std", "min", "max", "skew", "log_mean", "log_std"):
            assert getattr(s, key) == pytest.approx(ref[key], rel=1e-10, abs=1e-10), (name, key)
        finite = x[np.isfinite(x)]
        assert s.exact and s.distinct == len(np.unique(finite))
        for q in QUANTILE_LEVELS:
            assert s.quantiles[f"{q:g}"] == pytest.approx(float(np.quantile(finite, q)), rel=1e-12), (name, q)
        lo, hi = np.quantile(finite, [0.01, 0.99])
        assert (s.clip_lo, s.clip_hi) == pytest.approx((lo, hi), rel=1e-12)
        clipped = np.clip(finite, lo, hi)
        assert (s.clip_mean, s.clip_std) == pytest.approx((clipped.mean(), clipped.std()), rel=1e-10)
    # one bucket per distinct value when there are few (each value its own embedding)
    gain_values = np.unique(cols["gain"])
    edges = [e for e in stats["gain"].bucket_edges if math.isfinite(e)]
    assert edges == pytest.approx(((gain_values[1:] + gain_values[:-1]) / 2).tolist())
    assert len(stats["age"].bucket_edges) == 7  # 8 buckets: equal-frequency edges (74 distinct ages)
    assert stats["age"].bucket_edges == pytest.approx(np.quantile(cols["age"], np.arange(1, 8) / 8).tolist())


def _two_rank_stats(root: str, names: list[str]) -> dict:
    import torch.distributed as dist

    from parallel.distributed import all_gather_object

    plan, _ = _plan(root, names)
    stats = dense_stats(
        plan, names, StatsSettings(num_buckets=8), rank=dist.get_rank(), world_size=2, gather=all_gather_object
    )
    return {n: s.to_dict() for n, s in stats.items()}


def test_two_ranks_equal_one(dist_pool, data) -> None:
    root, cols = data
    names = list(cols)
    plan, _ = _plan(root, names)
    one = {n: s.to_dict() for n, s in dense_stats(plan, names, StatsSettings(num_buckets=8)).items()}
    a, b = dist_pool.run(_two_rank_stats, root, names)
    assert a == b  # every rank gets the same numbers
    for name in names:
        for key, value in one[name].items():
            if isinstance(value, float):
                assert a[name][key] == pytest.approx(value, rel=1e-10, abs=1e-12), (name, key)
            else:
                assert a[name][key] == value, (name, key)


def test_histogram_path_bounded_memory_and_within_one_bin(tmp_path: Path, monkeypatch) -> None:
    import pipeline.dense_stats as ds

    monkeypatch.setattr(ds, "MAX_DISTINCT", 500)  # force the histogram path on a small file set
    cols = _columns(seed=3)
    root = _write(tmp_path / "ds", cols)
    plan, _ = _plan(root, ["cont"])
    tracemalloc.start()
    stats = dense_stats(plan, ["cont"], StatsSettings(num_buckets=8))["cont"]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert not stats.exact and stats.distinct is None
    finite = cols["cont"][np.isfinite(cols["cont"])]
    assert stats.mean == pytest.approx(finite.mean(), rel=1e-10)  # moments stay exact
    t_lo, t_hi = np.arcsinh(finite.min()), np.arcsinh(finite.max())
    bin_width = (t_hi - t_lo) / ds.HIST_BINS
    ordered = np.sort(finite)
    for q in (0.01, 0.25, 0.5, 0.75, 0.99):
        r = q * (len(ordered) - 1)  # numpy's quantile interpolates between these two order statistics
        lo, hi = np.arcsinh(ordered[int(np.floor(r))]), np.arcsinh(ordered[int(np.ceil(r))])
        got = np.arcsinh(stats.quantiles[f"{q:g}"])
        assert lo - bin_width * 1.001 <= got <= hi + bin_width * 1.001, q
    # memory: a row group's columns, the value counts capped at MAX_DISTINCT, one histogram
    assert peak < 2 * 2**20 + ds.HIST_BINS * 8 * 4, peak
    assert MAX_DISTINCT >= 1 << 16  # the production cap is untouched


def test_cache_reused_and_keyed_by_data(tmp_path: Path, data, monkeypatch) -> None:
    root, cols = data
    plan, features = _plan(root, ["age", "gain"])
    cache = tmp_path / "run" / dense_prep.STATS_FILE
    first, reused = dense_prep.load_or_compute_stats(plan, features, cache)
    assert not reused and cache.is_file()
    calls = []
    monkeypatch.setattr(dense_prep, "dense_stats", lambda *a, **k: calls.append(1))
    again, reused = dense_prep.load_or_compute_stats(plan, features, cache)
    assert (
        reused
        and not calls
        and {n: s.to_dict() for n, s in again.items()} == {n: s.to_dict() for n, s in first.items()}
    )
    # other rows (the validation carve), other settings or a corrupt file: computed again, never trusted
    monkeypatch.undo()
    head, _ = carve_tail(plan, 0.1)
    _, reused = dense_prep.load_or_compute_stats(head, features, cache)
    assert not reused
    features.dense_buckets = 16
    _, reused = dense_prep.load_or_compute_stats(head, features, cache)
    assert not reused
    cache.write_text("{not json")
    _, reused = dense_prep.load_or_compute_stats(head, features, cache)
    assert not reused and json.loads(cache.read_text())["key"]


def test_auto_resolution_and_configured_transforms(data) -> None:
    root, cols = data
    plan, features = _plan(root, ["age", "gain", "cont", "neg"])
    features.dense_buckets = 100
    stats = dense_stats(plan, features.dense, dense_prep.settings_of(features))
    auto = {c.name: c.transform for c in dense_prep.resolve(features, stats)}
    # 74 ages and 6 gains <= 100 distinct values: bucketized; heavy-tailed positive: log1p; the rest standardized
    assert auto == {"age": "bucketize", "gain": "bucketize", "cont": "log1p", "neg": "standardize"}
    features.dense_transforms = {"cont": "clip", "age": "none", "gain": "standardize"}
    chosen = {c.name: c for c in dense_prep.resolve(features, stats)}
    assert chosen["cont"].clip_lo == stats["cont"].clip_lo and chosen["cont"].std == stats["cont"].clip_std
    assert (chosen["age"].mean, chosen["age"].std) == (0.0, 1.0)
    assert chosen["gain"].mean == stats["gain"].mean and not chosen["gain"].log1p


def test_dense_input_applies_the_transforms() -> None:
    spec = DenseInputSpec(num_features=3, bucketized=(2,), num_buckets=4, bucket_dim=2, missing_flags=True)
    m = DenseInput(spec, proj_dim=3, gen=torch.Generator().manual_seed(0))
    m.set_stats(
        log1p=[False, True, False], clip_lo=[-1.0, -math.inf, -math.inf], clip_hi=[5.0, math.inf, math.inf],
        mean=[1.0, 2.0, 0.0], std=[2.0, 0.5, 1.0], edges=[[0.5, 10.0, math.inf]],
    )  # fmt: skip
    x = torch.tensor([[3.0, 7.0, 0.0], [99.0, float("nan"), 20.0], [float("nan"), 0.0, float("nan")]])
    z, missing = m.transform(x)
    want = torch.tensor(
        [[(3 - 1) / 2, (math.log1p(7) - 2) / 0.5, 0.0], [(5 - 1) / 2, 0.0, 20.0], [0.0, (0 - 2) / 0.5, 0.0]]
    )
    torch.testing.assert_close(z, want)
    assert missing.tolist() == [[0, 0, 0], [0, 1, 0], [1, 0, 1]]
    out = m(x)
    assert out.shape == (3, 3 + 2) and m.out_width == 5
    cont = torch.cat([z[:, :2], missing], 1)
    torch.testing.assert_close(out[:, :3], cont @ m.proj_w + m.proj_b)
    # buckets: 0 below 0.5 -> 1, 20 above 10 -> 3, missing -> row 0
    torch.testing.assert_close(out[:, 3:], m.buckets[0][torch.tensor([1, 3, 0])])
