"""Exactly-once split, equal step counts, deterministic order and exact resume of ParquetLoader."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.audit import combine_audits
from pipeline.loader import ParquetLoader, dataset_audit
from pipeline.plan import plan_dataset
from tests.pipeline.fixtures import data_config, small_features, write_dataset

LAYOUT = [[5, 3], [7], [1, 4, 2], [9], [2]]  # 33 rows, uneven files and row groups
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root, ids = write_dataset(tmp_path_factory.mktemp("loader") / "ds", LAYOUT)
    data = data_config(root)
    feats = small_features()
    return plan_dataset(str(root), data, feats), data, feats, ids


def make(dataset, rank=0, world_size=1, workers=0, seed=1, shuffle=True, drop_last=False, bsz=4):
    plan, data, feats, _ = dataset
    return ParquetLoader(
        plan, data, feats, rank=rank, world_size=world_size, batch_size=bsz, seed=seed,
        shuffle=shuffle, drop_last=drop_last, num_workers=workers,
    )  # fmt: skip


def real_ids(batches) -> list[int]:
    return [int(x) for b in batches for x in b.row_ids[b.weights > 0]]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exactly_once(dataset, world_size, workers, drop_last):
    _, _, _, ids = dataset
    bsz = 4
    seen, lens, audits = [], [], []
    for rank in range(world_size):
        loader = make(dataset, rank, world_size, workers, drop_last=drop_last, bsz=bsz)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(b.size == bsz and b.sparse.stride() == bsz for b in batches)
        for b in batches:
            pad = b.weights == 0
            assert (b.row_ids[pad] == -1).all() and (b.row_ids[~pad] >= 0).all()
        lens.append(len(loader))
        seen += real_ids(batches)
        audits.append(loader.audit())
        assert loader.stats()["rows"] == len(real_ids(batches))
    assert len(set(lens)) == 1, f"ranks disagree on step count: {lens}"
    assert len(seen) == len(set(seen)), "a row was read twice"
    if drop_last:
        assert len(seen) == lens[0] * world_size * bsz
        assert set(seen) <= set(ids.tolist())
    else:
        assert sorted(seen) == ids.tolist()
        total = combine_audits(audits)
        assert {"count": total["count"], "checksum": total["checksum"]} == dataset_audit(dataset[0], dataset[1])


def test_same_seed_same_order_other_seed_differs(dataset):
    a = real_ids(make(dataset, seed=3))
    b = real_ids(make(dataset, seed=3))
    c = real_ids(make(dataset, seed=4))
    assert a == b
    assert a != c and sorted(a) == sorted(c)
    assert real_ids(make(dataset, shuffle=False)) == sorted(a)  # no shuffle: file order


def test_workers_do_not_change_rows_per_rank_set(dataset):
    """Every worker count covers the dataset; the order with workers is deterministic too."""
    a = real_ids(make(dataset, workers=2, seed=5))
    b = real_ids(make(dataset, workers=2, seed=5))
    assert a == b


def test_epochs_reshuffle_and_auto_advance(dataset):
    loader = make(dataset, seed=2)
    e0 = real_ids(loader)
    assert loader.audit()["epoch"] == 0 and loader.batches_done == len(loader)
    e1 = real_ids(loader)  # a new __iter__ at the end of an epoch starts the next one
    assert loader.epoch == 1 and e0 != e1 and sorted(e0) == sorted(e1)
    loader.set_epoch(1)  # same epoch: no-op, the epoch is finished
    assert loader.batches_done == len(loader)
    loader.set_epoch(0)
    assert real_ids(loader) == e0


def _save_load(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_mid_epoch(dataset, workers, world_size):
    for rank in range(world_size):
        full = make(dataset, rank, world_size, workers)
        reference = list(full)
        ref_audit = full.audit()
        for cut in (1, 3):
            first = make(dataset, rank, world_size, workers)
            it = iter(first)
            head = [next(it) for _ in range(cut)]
            sd = _save_load(first.state_dict())
            del it
            resumed = make(dataset, rank, world_size, workers)
            resumed.load_state_dict(sd)
            tail = list(resumed)
            assert real_ids(head) + real_ids(tail) == real_ids(reference)
            assert resumed.audit() == ref_audit
            for a, b in zip(tail, reference[cut:]):
                assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.dense, b.dense)
            # a second resume from the resumed loader's state also continues exactly
            again = make(dataset, rank, world_size, workers)
            again.load_state_dict(_save_load(resumed.state_dict()))
            assert list(again) != [] and again.epoch == 1  # finished epoch 0 -> next iter is epoch 1


def test_resume_rejects_other_settings(dataset):
    sd = make(dataset, workers=0).state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        make(dataset, workers=1).load_state_dict(sd)
    with pytest.raises(ValueError, match="batch_size"):
        make(dataset, bsz=5).load_state_dict(sd)


_CHILD = """
import sys, torch
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset
from tests.pipeline.fixtures import data_config, small_features
root, state_path = sys.argv[1], sys.argv[2]
data, feats = data_config(root), small_features()
loader = ParquetLoader(plan_dataset(root, data, feats), data, feats, rank=1, world_size=2, batch_size=4, seed=1,
                       shuffle=True, drop_last=False, num_workers=1)
loader.load_state_dict(torch.load(state_path, weights_only=True))
print(",".join(str(int(x)) for b in loader for x in b.row_ids[b.weights > 0]))
print(loader.audit()["checksum"])
"""


def test_resume_in_fresh_process(dataset, tmp_path):
    plan, data, _, _ = dataset
    reference = make(dataset, 1, 2, workers=1)
    ref_ids = real_ids(reference)
    first = make(dataset, 1, 2, workers=1)
    it = iter(first)
    head = [next(it) for _ in range(2)]
    torch.save(first.state_dict(), tmp_path / "state.pt")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, data.train, str(tmp_path / "state.pt")],
        capture_output=True, text=True, cwd=REPO, check=True, env={"PYTHONPATH": str(REPO), "PATH": ""},
    ).stdout.split()  # fmt: skip
    tail = [int(x) for x in out[0].split(",") if x]
    assert real_ids(head) + tail == ref_ids
    assert int(out[1]) == reference.audit()["checksum"]


def test_batch_contents(dataset):
    """Labels, dense, user ids and KJT layout match what the fixture wrote for each row id."""
    from tests.pipeline.ids_ref import map_ids

    _, _, feats, _ = dataset
    for b in make(dataset, shuffle=True):
        real = b.weights > 0
        rid = b.row_ids[real].numpy()
        assert np.array_equal(b.labels[real, 0].numpy(), rid % 2)
        assert np.array_equal(b.dense[real, 0].numpy(), rid.astype(np.float32))
        assert np.array_equal(b.user_ids[real].numpy(), rid // 3)
        kjt = b.sparse.to_dict()
        assert list(b.sparse.keys()) == [sf.name for sf in feats.sparse]
        u0 = kjt["u0"]
        assert np.array_equal(u0.values().numpy(), map_ids(rid // 3, 50, "hash"))
        seq = kjt["s_item"]
        lens = seq.lengths()[real.nonzero().squeeze(1)].numpy()
        assert np.array_equal(lens, np.minimum(rid % 5, 3))  # truncated to max_len = 3
        expect = [map_ids(np.arange(r + k - m, r + k), 50, "hash") for r, k, m in zip(rid, rid % 5, lens)]
        got = seq.values().numpy()[: int(lens.sum())]
        assert np.array_equal(got, np.concatenate(expect))  # the last max_len ids of each row
        assert (seq.lengths()[~real] == 0).all()


def test_too_small_dataset_is_an_error(dataset):
    from pipeline.errors import DataError

    with pytest.raises(DataError, match="fewer than world_size x batch_size"):
        make(dataset, world_size=3, bsz=16, drop_last=True)
