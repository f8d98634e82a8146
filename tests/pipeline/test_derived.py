"""Derived dense features: `len(<list column>)` in the loader, the statistics pass and the schema checks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import FeaturesConfig
from pipeline.dense_stats import StatsSettings, dense_stats
from pipeline.derived import add_derived, length_source, length_values, physical_columns
from pipeline.errors import DataError
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset, required_columns
from schema import ConfigError
from tests.pipeline.fixtures import data_config, make_table, small_features, write_dataset


def _features() -> FeaturesConfig:
    """The small fixture with dense = [d0, len(s_item)] (s_item has row_id % 5 ids, max_len 3)."""
    return replace(small_features(), dense=["d0", "len(s_item)"])


def test_names_and_values() -> None:
    assert length_source("len(hist_items)") == "hist_items" and length_source("hist_count") is None
    assert length_source("len()") is None and length_source("xlen(a)") is None
    assert physical_columns(["d0", "len(s)", "s", "len(t)"]) == ["d0", "s", "t"]
    arr = pa.array([[1, 2], None, [], [5, 6, 7]], pa.list_(pa.int64()))
    assert length_values(arr).tolist() == [2.0, 0.0, 0.0, 3.0] and length_values(arr).dtype == np.float32
    with pytest.raises(TypeError, match="expected a list column, got int64"):
        length_values(pa.array([1, 2]))
    t = add_derived(pa.table({"s": arr, "len(s)": pa.array([9.0] * 4)}), ["len(s)", "s"])
    assert t.column_names == ["s", "len(s)"] and t.column("len(s)").to_pylist() == [2.0, 0.0, 0.0, 3.0]


def test_loader_and_stats_see_the_untruncated_length(tmp_path) -> None:
    root, ids = write_dataset(tmp_path / "ds", [[7, 5], [9]])
    feats = _features()
    data = data_config(root)
    plan = plan_dataset(str(root), data, feats)
    assert "len(s_item)" not in plan.columns and "s_item" in required_columns(data, feats)
    loader = ParquetLoader(plan, data, feats, rank=0, world_size=1, batch_size=4, seed=0, shuffle=True,
                           drop_last=False, num_workers=0)  # fmt: skip
    seen = []
    for b in loader:
        real = b.weights > 0
        rid = b.row_ids[real].numpy()
        assert np.array_equal(b.dense[real, 1].numpy(), (rid % 5).astype(np.float32))  # not capped at max_len 3
        assert np.array_equal(b.dense[real, 0].numpy(), rid.astype(np.float32))
        seen.extend(rid.tolist())
    assert sorted(seen) == ids.tolist()
    stats = dense_stats(plan, feats.dense, StatsSettings(num_buckets=4, clip_quantile=0.01))
    assert stats["len(s_item)"].mean == pytest.approx(float(np.mean(ids % 5)), rel=1e-6)


def test_bad_sources_are_named(tmp_path) -> None:
    root, _ = write_dataset(tmp_path / "ds", [[4]])
    with pytest.raises(ConfigError, match=r"features.dense\[1\]' = 'len\(u0\)': 'u0' is a scalar sparse feature"):
        replace(small_features(), dense=["d0", "len(u0)"]).validate()
    not_list = replace(small_features(), dense=["d0", "len(d1)"])
    want = r"column 'd1' has type float; expected a list column \(dense feature 'len\(d1\)'"
    with pytest.raises(DataError, match=want):
        plan_dataset(str(root), data_config(root), not_list)
    pq.write_table(make_table(np.arange(4, 8)).drop_columns(["s_item"]), root / "part-009.parquet")
    other = replace(small_features(), dense=["len(s_item)"], sparse=small_features().sparse[:2])
    with pytest.raises(DataError, match=r"part-009\.parquet: column 's_item' is missing; expected a list column"):
        plan_dataset(str(root), data_config(root), other)
