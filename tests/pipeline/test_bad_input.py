"""Every bad-input case: fail fast naming file and column, or skip and count, or repair and count."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import SparseFeature
from pipeline.errors import DataError
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset
from tests.pipeline.fixtures import data_config, make_table, small_features, write_dataset


def _loader(root, feats=None, **kw):
    data = data_config(root, **kw)
    feats = feats or small_features()
    plan = plan_dataset(str(root), data, feats)
    return ParquetLoader(
        plan, data, feats, rank=0, world_size=1, batch_size=4, seed=0, shuffle=False, drop_last=False, num_workers=0
    )


def _good(tmp_path):
    root, _ = write_dataset(tmp_path / "ds", [[6], [5]])
    return root


def test_corrupt_file_named(tmp_path):
    root = _good(tmp_path)
    (root / "part-002.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"part-002\.parquet: not a readable Parquet file"):
        _loader(root)


def test_truncated_file_named(tmp_path):
    root = _good(tmp_path)
    raw = (root / "part-001.parquet").read_bytes()
    (root / "part-001.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"part-001\.parquet: not a readable Parquet file"):
        _loader(root)


def test_missing_column_named(tmp_path):
    root = _good(tmp_path)
    pq.write_table(make_table(np.arange(100, 104)).drop_columns(["d1"]), root / "part-009.parquet")
    with pytest.raises(DataError, match=r"part-009\.parquet: column 'd1' is missing; expected a dense feature"):
        _loader(root)


def test_wrong_type_named(tmp_path):
    root = _good(tmp_path)
    t = make_table(np.arange(100, 104))
    t = t.set_column(t.schema.get_field_index("u0"), "u0", pa.array(["a", "b", "c", "d"]))
    pq.write_table(t, root / "part-009.parquet")
    with pytest.raises(DataError, match=r"part-009\.parquet: column 'u0' has type string; expected int64"):
        _loader(root)
    t = make_table(np.arange(100, 104))
    t = t.set_column(t.schema.get_field_index("s_item"), "s_item", pa.array(np.arange(4)))
    pq.write_table(t, root / "part-009.parquet")
    with pytest.raises(DataError, match=r"column 's_item' has type int64; expected list<int64> \(max_len=3\)"):
        _loader(root)


def test_empty_file_named(tmp_path):
    root = _good(tmp_path)
    pq.write_table(make_table(np.arange(0)), root / "part-009.parquet")
    with pytest.raises(DataError, match=r"part-009\.parquet: file is empty"):
        _loader(root)


def test_skip_mode_counts_bad_files(tmp_path):
    root = _good(tmp_path)
    (root / "part-002.parquet").write_bytes(b"garbage")
    pq.write_table(make_table(np.arange(0)), root / "part-003.parquet")
    pq.write_table(make_table(np.arange(50, 54)).drop_columns(["click"]), root / "part-004.parquet")
    loader = _loader(root, on_bad_file="skip")
    assert [p.rsplit("/", 1)[1] for p, _ in loader.plan.skipped] == [f"part-00{i}.parquet" for i in (2, 3, 4)]
    assert "column 'click' is missing" in loader.plan.skipped[2][1]
    ids = sorted(int(x) for b in loader for x in b.row_ids[b.weights > 0])
    assert ids == list(range(11))
    assert loader.stats()["bad_files_skipped"] == 3


def _write(root, table, name="part-000.parquet"):
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / name, row_group_size=4)
    return root


def test_labels_outside_01_error_names_file_column_row_group(tmp_path):
    t = make_table(np.arange(8))
    t = t.set_column(t.schema.get_field_index("click"), "click", pa.array([0, 1, 0, 1, 0, 7, 1, 0]))
    root = _write(tmp_path / "ds", t)
    with pytest.raises(
        DataError, match=r"part-000\.parquet: column 'click' row group 1: label values must be 0 or 1, found 7"
    ):
        list(_loader(root))


def test_null_labels_error(tmp_path):
    t = make_table(np.arange(8))
    t = t.set_column(t.schema.get_field_index("finish"), "finish", pa.array([0, 1, None, 1, 0, 0, 1, 0], pa.float32()))
    root = _write(tmp_path / "ds", t)
    with pytest.raises(DataError, match=r"column 'finish' row group 0: 1 null labels"):
        list(_loader(root))


def test_missing_dense_values_stay_nan_and_id_nulls_are_repaired_and_counted(tmp_path):
    t = make_table(np.arange(8))
    t = t.set_column(
        t.schema.get_field_index("d1"), "d1", pa.array([np.nan, np.inf, -np.inf, 1, None, 2, 3, 4], pa.float32())
    )
    t = t.set_column(t.schema.get_field_index("u0"), "u0", pa.array([1, None, 3, 4, 5, 6, None, 8], pa.int64()))
    seq = pa.array([[1, 2], None, [3, None, 4], [], [5], None, [6], [7, 8]], pa.list_(pa.int64()))
    t = t.set_column(t.schema.get_field_index("s_item"), "s_item", seq)
    root = _write(tmp_path / "ds", t)
    loader = _loader(root)
    batches = list(loader)
    dense = np.concatenate([b.dense.numpy() for b in batches])
    # null, NaN and +-inf are all missing: NaN in the batch (the model's dense input fills them), counted once
    assert np.isnan(dense[[0, 1, 2, 4], 1]).all() and dense[3, 1] == 1 and np.isfinite(dense[5:, 1]).all()
    assert np.isfinite(np.delete(dense, 1, axis=1)).all()
    st = loader.stats()
    assert st["dense_missing"] == 4
    assert st["nulls_repaired"] == 2 + 2 + 1  # two u0 nulls, two null lists, one null element
    u0_len = np.concatenate([b.sparse.to_dict()["u0"].lengths().numpy() for b in batches])
    assert u0_len.tolist() == [1, 0, 1, 1, 1, 1, 0, 1]
    s_len = np.concatenate([b.sparse.to_dict()["s_item"].lengths().numpy() for b in batches])
    assert s_len.tolist() == [2, 0, 2, 0, 1, 0, 1, 2]


def test_negative_and_out_of_range_ids_hashed_and_counted(tmp_path):
    t = make_table(np.arange(8))
    t = t.set_column(t.schema.get_field_index("u0"), "u0", pa.array([0, -1, 3, 49, 50, -7, 10**12, 5], pa.int64()))
    t = t.set_column(t.schema.get_field_index("s_item"), "s_item", pa.array([[-1, 2]] + [[]] * 7, pa.list_(pa.int64())))
    root = _write(tmp_path / "ds", t)
    loader = _loader(root, feats=small_features(vocab=50, id_mapping="modulo"))
    batches = list(loader)
    u0 = np.concatenate([b.sparse.to_dict()["u0"].values().numpy() for b in batches])
    assert ((u0 >= 0) & (u0 < 50)).all()
    assert u0[[0, 2, 3, 7]].tolist() == [0, 3, 49, 5]  # in range: kept
    assert loader.stats()["ids_out_of_range"] == 4 + 1


def test_string_ids_hashed(tmp_path):
    root, _ = write_dataset(tmp_path / "ds", [[5]], string_feature=True)
    feats = small_features(string_feature=True)
    vals = [b.sparse.to_dict()["i0"].values() for b in _loader(root, feats=feats)]
    assert all(((v >= 0) & (v < 50)).all() for v in vals)
    feats.sparse[1] = SparseFeature(name="i0", group="item", vocab_size=50)  # int64 expected: a string column fails
    with pytest.raises(DataError, match="column 'i0' has type string; expected int64"):
        _loader(root, feats=feats)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        _loader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    with pytest.raises(DataError, match="no data files found"):
        _loader(tmp_path / "empty")
