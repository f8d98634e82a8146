"""The compiled pass (pipeline/native.c) against plain-Python references: the modulo by reciprocal is
exact for every divisor, blocks built from windows over several decoded pieces (slices starting
mid-piece, nulls in one piece only, truncated lists, strings, 'modulo' and 'raw' ids, NaN dense values,
padding) equal a row-by-row reference, and building fails with one line when there is no compiler."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import ids, native
from pipeline.config import DataConfig, FeaturesConfig, SparseFeature
from pipeline.convert import STATS, block_arrays, fill_block, to_window
from pipeline.decode import decode_piece
from tests.pipeline import ids_ref

DIVISORS = [1, 2, 3, 7, 1000, 99_991, 2**20, 2**31 - 1, 2**32 + 15, 2**40 + 3, 2**62 + 1, 2**63, 2**63 + 1, 2**64 - 1]


def _reference_mod(x: np.ndarray, d: int) -> np.ndarray:
    return np.array([int(h) % d for h in ids.mix64(x)], dtype=np.uint64).view(np.int64)


def test_hash_mod_is_exact_for_every_divisor():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.integers(-(2**63), 2**63 - 1, 2000, dtype=np.int64), np.arange(-5, 5),
        np.array([2**63 - 1, -(2**63)], dtype=np.int64),
    ])  # fmt: skip
    for d in DIVISORS + [int(v) for v in rng.integers(1, 2**62, 20)]:
        out = np.empty_like(x)
        native.hash_mod(x, d, out)
        assert np.array_equal(out, _reference_mod(x, d)), d


def test_hash_mod_matches_map_ids():
    x = np.random.default_rng(1).integers(-10, ids.MEMO_IDS * 2, 20_000)
    for vocab in (50, 1000, 99_991):
        out = np.empty_like(x)
        native.hash_mod(x, vocab, out)
        assert np.array_equal(out, ids_ref.map_ids(x, vocab, "hash"))


FEATURES = FeaturesConfig(
    labels=["click"],
    user_id="user_id",
    dense=["d0", "d1"],
    sparse=[
        SparseFeature(name="a", vocab_size=97),  # scalar, hashed; nulls in the second slice only
        SparseFeature(name="b", vocab_size=10, id_mapping="modulo"),  # out-of-range ids hashed + counted
        SparseFeature(name="c", vocab_size=2**40, id_mapping="raw"),
        SparseFeature(name="s", vocab_size=1000, max_len=3),  # lists, truncated to their last 3 ids
        SparseFeature(name="t", vocab_size=64, dtype="string"),
    ],
)


def _slice_table(row0: int, n: int, nulls: bool) -> pa.Table:
    r = np.arange(row0, row0 + n)
    a = [None if nulls and x % 4 == 0 else int(x) * 11 for x in r]
    lists = [None if nulls and x % 7 == 3 else [int(x * 100 + k) for k in range(x % 6)] for x in r]
    if nulls:
        lists = [v if v is None or x % 5 else [*v, None] for x, v in zip(r, lists)]  # a null id inside a list
    d0 = np.where(r % 9 == 2, np.nan, r).astype(np.float32)
    return pa.table({
        "row_id": pa.array(r, pa.int64()), "user_id": pa.array(r // 2, pa.int64()),
        "click": pa.array(r % 2, pa.int64()), "d0": pa.array(d0), "d1": pa.array(-r.astype(np.float32)),
        "a": pa.array(a, pa.int64()), "b": pa.array(r - 20, pa.int64()), "c": pa.array(r * 3, pa.int64()),
        "s": pa.array(lists, pa.list_(pa.int64())), "t": pa.array([f"x{x % 13}" for x in r]),
    })  # fmt: skip


def _reference_row(r: int, nulls_part: bool) -> dict[str, list[int]]:
    """What row id r must carry, straight from the definitions in pipeline.ids and the config."""
    h = lambda v, vocab: int(ids_ref.map_ids(np.array(v, np.int64), vocab, "hash"))  # noqa: E731
    out = {"a": [] if nulls_part and r % 4 == 0 else [h(r * 11, 97)]}
    out["b"] = [r - 20] if 0 <= r - 20 < 10 else [h(r - 20, 10)]
    out["c"] = [r * 3]
    lst = [] if nulls_part and r % 7 == 3 else [r * 100 + k for k in range(r % 6)]
    out["s"] = [h(v, 1000) for v in lst[-3:]]
    out["t"] = [h(int(ids.hash_strings(pa.array([f"x{r % 13}"]))[0][0]), 64)]
    return out


@pytest.mark.parametrize("perm_seed", [None, 3])
def test_blocks_from_multi_slice_windows_match_a_row_by_row_reference(perm_seed):
    tables = [_slice_table(0, 11, False), _slice_table(11, 6, True), _slice_table(17, 12, False)]
    pieces = [decode_piece(t, DataConfig(), FEATURES) for t in tables]
    slices = [(pieces[0], 0, 11), (pieces[1], 1, 6), (pieces[2], 0, 9)]  # rows 0..10, 12..16, 17..25
    n = sum(b - a for _, a, b in slices)
    perm = None if perm_seed is None else np.random.default_rng(perm_seed).permutation(n)
    win = to_window(slices, FEATURES, perm)
    bsz, nb = 4, 7  # 28 rows: the last batches are partly and fully padding
    buf, header = fill_block(win, 0, nb, bsz, FEATURES, lambda k: torch.zeros(k, dtype=torch.uint8))
    arr = block_arrays(buf.numpy(), header)
    order = win.order.tolist()
    s_names = [sf.name for sf in FEATURES.sparse]
    for j in range(nb):
        vals = arr["values"][arr["voff"][j] : arr["voff"][j + 1]].tolist()
        pos = 0
        rows = order[j * bsz : (j + 1) * bsz]
        real_rows = range(12, 17)  # the second slice (rows 12..16) has the nulls
        for s, name in enumerate(s_names):
            for i in range(bsz):
                length = int(arr["lengths"][j, s, i])
                got, pos = vals[pos : pos + length], pos + length
                if i >= len(rows):
                    assert length == 0
                    continue
                r = int(arr["row"][j, i])
                assert got == _reference_row(r, r in real_rows)[name], (name, r)
        assert pos == len(vals)
        for i in range(bsz):
            r = int(arr["row"][j, i])
            if i >= len(rows):
                assert r == -1 and arr["weights"][j, i] == 0 and not arr["dense"][j, i].any()
                continue
            d0, d1 = arr["dense"][j, i].tolist()
            assert (np.isnan(d0) if r % 9 == 2 else d0 == float(r)) and d1 == float(-r)
            assert arr["labels"][j, i, 0] == r % 2 and arr["user"][j, i] == r // 2 and arr["weights"][j, i] == 1
        real = [int(x) for x in arr["row"][j] if x >= 0]
        stats = dict(zip(STATS, arr["stats"][j].tolist()))
        assert stats["rows"] == len(real) and stats["padded_rows"] == bsz - len(real)
        assert stats["dense_missing"] == sum(r % 9 == 2 for r in real)
        assert stats["ids_out_of_range"] == sum(not 0 <= r - 20 < 10 for r in real)
        nulls = sum((r % 4 == 0) + (r % 7 == 3) + (r % 7 != 3 and r % 5 == 0) for r in real if r in real_rows)
        assert stats["nulls_repaired"] == nulls
        mixed = ids.mix64(np.array(real, np.int64)).sum(dtype=np.uint64) if real else np.uint64(0)
        assert np.uint64(arr["stats"][j, -1]) == mixed


def test_fill_sparse_refuses_ids_that_do_not_fit():
    win = to_window([(decode_piece(_slice_table(0, 8, False), DataConfig(), FEATURES), 0, 8)], FEATURES)
    plan, total = native.plan_block(2, 4, win.order, win.part_start, win.offsets_SU, win.max_len_S)
    assert total > 3
    values, lengths, voff = np.empty(3, np.int64), np.empty((2, 5, 4), np.int32), np.empty(3, np.int64)
    sparse = (win.part_start, win.ids_SU, win.offsets_SU, win.max_len_S, win.vocab_S, win.memo_S, ids.MEMO_IDS)
    with pytest.raises(ValueError, match="do not fit in 3 values"):
        native.fill_sparse(2, 4, 8, plan, *sparse, values, lengths, voff)


def test_build_names_by_source_and_fails_in_one_line_without_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKMIXER_BUILD_DIR", str(tmp_path))
    path = native.build()
    assert path.parent == tmp_path and path.name.startswith("librm_pipeline_") and path.exists()
    assert native.build() == path  # built once
    monkeypatch.setenv("RANKMIXER_BUILD_DIR", str(tmp_path / "other"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match="no C compiler found") as e:
        native.build()
    assert "\n" not in str(e.value)
