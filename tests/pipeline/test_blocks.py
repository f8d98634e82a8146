"""Block buffers: in-place id mapping equals map_ids, recycled shared-memory buffers never overwrite a
batch the trainer still holds, and interleaved key orders lay ids out key-major."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import ids
from pipeline.config import FeaturesConfig, SparseFeature
from pipeline.loader import _RING, ParquetLoader
from pipeline.plan import plan_dataset
from tests.pipeline import ids_ref
from tests.pipeline.fixtures import data_config, small_features, write_dataset


@pytest.mark.parametrize("mode", ["hash", "modulo", "raw"])
def test_map_ids_into_equals_map_ids(mode):
    rng = np.random.default_rng(1)
    cases = [
        rng.integers(0, 1000, 10),  # few small ids: direct path unless the memo table exists
        rng.integers(0, ids.MEMO_IDS, 5000),  # memo path
        np.concatenate([rng.integers(0, 50, 5000), [-3, 2**40, ids.MEMO_IDS]]),  # out-of-table ids
        np.zeros(0, np.int64),
    ]
    for x in cases:
        for vocab in (50, 99_991):
            expect, expect_oor = ids_ref.map_ids_counted(x, vocab, mode)
            out = np.full(len(x), -7, np.int64)
            oor = ids.map_ids_into(x, vocab, mode, out)
            assert np.array_equal(out, expect)
            assert np.array_equal(np.zeros(len(x), bool) if oor is None else oor, expect_oor)


def _check(batch, feats) -> list[int]:
    real = batch.weights > 0
    rid = batch.row_ids[real].numpy()
    assert np.array_equal(batch.labels[real, 0].numpy(), rid % 2)
    assert np.array_equal(batch.dense[real, 0].numpy(), rid.astype(np.float32))
    assert np.array_equal(batch.sparse.to_dict()["u0"].values().numpy(), ids_ref.map_ids(rid // 3, 50, "hash"))
    return rid.tolist()


@pytest.mark.parametrize("workers", [0, 1])
def test_recycled_buffers_never_overwrite_held_batches(tmp_path, workers):
    """Many more blocks than ring slots (in a reader process, or in the trainer itself): batches held to
    the end keep their contents; batches dropped as they come (their buffers recycled) are right when
    they arrive."""
    root, all_ids = write_dataset(tmp_path / "ds", [[80, 48], [72]])
    data, feats = data_config(root), small_features()
    plan = plan_dataset(str(root), data, feats)

    def make() -> ParquetLoader:
        return ParquetLoader(
            plan, data, feats, rank=0, world_size=1, batch_size=4, seed=0, shuffle=True, drop_last=False,
            num_workers=workers,
        )  # fmt: skip

    assert len(make()) // make().block > 2 * _RING
    held = list(make())
    seen = [r for b in held for r in _check(b, feats)]
    assert sorted(seen) == all_ids.tolist()
    streamed = [r for b in make() for r in _check(b, feats)]
    assert streamed == seen  # same order, contents right on arrival


def test_interleaved_keys_are_key_major(tmp_path):
    """A list feature between scalar ones: each key's ids sit in config order, rows in batch order."""
    root, _ = write_dataset(tmp_path / "ds", [[6, 5]])
    base = small_features()
    feats = FeaturesConfig(
        labels=base.labels, user_id=base.user_id, dense=base.dense,
        sparse=[base.sparse[0], base.sparse[2], base.sparse[1], SparseFeature(name="user_id", vocab_size=50)],
    )  # fmt: skip
    data = data_config(root)
    plan = plan_dataset(str(root), data, feats)
    for workers in (0, 1):
        loader = ParquetLoader(
            plan, data, feats, rank=0, world_size=1, batch_size=4, seed=2, shuffle=True, drop_last=False,
            num_workers=workers,
        )  # fmt: skip
        for b in loader:
            real = (b.weights > 0).numpy()
            rid = b.row_ids.numpy()[real]
            kjt = b.sparse.to_dict()
            assert list(b.sparse.keys()) == ["u0", "s_item", "i0", "user_id"]
            assert np.array_equal(kjt["u0"].values().numpy(), ids_ref.map_ids(rid // 3, 50, "hash"))
            assert np.array_equal(kjt["i0"].values().numpy(), ids_ref.map_ids(rid * 7, 50, "hash"))
            assert np.array_equal(kjt["user_id"].values().numpy(), ids_ref.map_ids(rid // 3, 50, "hash"))
            lens = kjt["s_item"].lengths().numpy()
            assert np.array_equal(lens[real], np.minimum(rid % 5, 3)) and (lens[~real] == 0).all()
