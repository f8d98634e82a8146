"""The item catalogue behind `a[s]` features: built exactly (against a row-by-row Python reference, 1 and
2 ranks, within and beyond its item limit), looked up exactly by the loader, saved and loaded with the
vocabularies, and refused with one line where the config cannot work."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.catalog import CatalogBuilder, ItemCatalog, gather_segments
from pipeline.config import FeaturesConfig, SparseFeature
from pipeline.derived import physical_columns, sparse_columns
from pipeline.errors import DataError
from pipeline.ids import hash_strings
from pipeline.loader import ParquetLoader
from pipeline.plan import carve_tail, plan_dataset, required_columns
from pipeline.vocab import build_vocabs, load_vocabs, resolve_sizes, save_vocabs, scan_training_rows
from schema import ConfigError
from tests.pipeline.fixtures import data_config, ordered_loader

N_FILES, ROWS, RG, HIST, GENRES, OUT = 3, 1500, 400, 4, 3, 7


def _features(out_len: int = OUT) -> FeaturesConfig:
    """item (the candidate), hist (items, shares its table), genre (list attribute), genre[hist] (derived)."""
    kw = dict(id_mapping="vocab", vocab_size="auto", min_count=1)
    return FeaturesConfig(
        labels=["click"],
        user_id="",
        item_id="item",
        sparse=[
            SparseFeature(name="item", group="item", table="item", **kw),
            SparseFeature(name="genre", group="item", table="genre", max_len=GENRES, **kw),
            SparseFeature(name="hist", group="sequence", table="item", max_len=HIST, **kw),
            SparseFeature(name="genre[hist]", group="sequence", table="genre", max_len=out_len, **kw),
        ],
    )  # fmt: skip


def _columns(seed: int = 0) -> dict[str, list]:
    """Zipf items whose genres mostly follow the item, sometimes not (the first row must win), with null
    and empty genre lists, null items, and histories longer than HIST with ids never seen as candidates."""
    rng = np.random.default_rng(seed)
    n = N_FILES * ROWS
    item = (rng.zipf(1.4, n) + 10).tolist()
    for r in rng.choice(n, 30, replace=False):
        item[r] = None
    genre: list[list[int] | None] = []
    for it in item:
        u = rng.random()
        base = [] if it is None else [it % 5, 5 + it % 3, 8 + it % 2, it % 4][: 1 + (it or 0) % 4]
        genre.append(None if u < 0.03 else [] if u < 0.05 else [int(rng.integers(20, 30))] if u < 0.2 else base)
    hist = [(rng.zipf(1.4, int(rng.integers(0, 7))) + 10).tolist() + ([999_999] if rng.random() < 0.1 else [])
            for _ in range(n)]  # fmt: skip
    return {"click": [r % 2 for r in range(n)], "item": item, "genre": genre, "hist": hist}


def _write(root: Path, cols: dict[str, list]) -> str:
    """N_FILES files of ROWS rows in row order (so units follow the rows), row groups of RG rows."""
    root.mkdir(parents=True, exist_ok=True)
    types = {"click": pa.int64(), "item": pa.int64(), "genre": pa.list_(pa.int64()), "hist": pa.list_(pa.int64())}
    table = pa.table({k: pa.array(cols[k], t) for k, t in types.items()})
    for i in range(N_FILES):
        pq.write_table(table.slice(i * ROWS, ROWS), root / f"part-{i}.parquet", row_group_size=RG)
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, dict[str, list]]:
    cols = _columns()
    return _write(tmp_path_factory.mktemp("catalog"), cols), cols


def _reference(cols: dict[str, list]) -> dict[int, list[int]]:
    """item -> the genres of its first row in file order (the reader's view: the last GENRES ids)."""
    out: dict[int, list[int]] = {}
    for it, g in zip(cols["item"], cols["genre"]):
        if it is not None and it not in out:
            out[it] = (g or [])[-GENRES:]
    return out


def _plan(root: str, features: FeaturesConfig):
    return plan_dataset(root, data_config(root, row_id_column=""), features)


def _as_dict(cat: ItemCatalog) -> dict[int, list[int]]:
    return {int(i): cat.values[cat.offsets[c] : cat.offsets[c + 1]].tolist() for c, i in enumerate(cat.ids)}


def test_lookup_and_segments_against_python() -> None:
    cat = ItemCatalog(np.array([3, 7, 9], np.int64), np.array([0, 2, 2, 5], np.int64), np.array([1, 2, 4, 5, 6]))
    lengths, values = cat.lookup(np.array([3, 0, 2, 1]), np.array([9, 3, 7, 8, 3, 9], np.int64))
    # rows: [9, 3, 7] -> 4 5 6 1 2 (7 has no attributes); [] -> []; [8, 3] -> 1 2 (8 unknown); [9] -> 4 5 6
    assert lengths.tolist() == [5, 0, 2, 3] and values.tolist() == [4, 5, 6, 1, 2, 1, 2, 4, 5, 6]
    empty = ItemCatalog(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64))
    assert empty.lookup(np.array([2]), np.array([1, 2]))[0].tolist() == [0]
    vals = np.arange(10, 20)
    assert gather_segments(vals, np.array([5, 0, 9]), np.array([2, 0, 1])).tolist() == [15, 16, 19]


def test_lookup_keeps_each_rows_last_ids_and_gathers_table_rows() -> None:
    """max_len against gather-all-then-cut (items cut in two, rows under and over the cap, misses), and
    table_rows: mapped once per vocabulary, recomputed for another one."""
    rng = np.random.default_rng(5)
    lens_c = rng.integers(0, 5, 40)
    cat = ItemCatalog(
        np.arange(40, dtype=np.int64) * 3, np.concatenate([[0], np.cumsum(lens_c)]), rng.integers(0, 99, lens_c.sum())
    )
    lengths_n = rng.integers(0, 9, 300)
    items = rng.integers(0, 130, int(lengths_n.sum()))  # a third of them are in the catalogue
    all_lengths, all_values = cat.lookup(lengths_n, items)
    bags = np.split(all_values, np.cumsum(all_lengths)[:-1])
    for max_len in (1, 4, 7, 1000):
        lengths, values = cat.lookup(lengths_n, items, max_len)
        want = [b[-max_len:] for b in bags]
        assert lengths.tolist() == [len(w) for w in want] and values.tolist() == np.concatenate(want).tolist()
    assert (all_lengths > 7).any() and (all_lengths[all_lengths > 0] < 4).any()

    class Shift:  # a stand-in vocabulary: raw id -> id + k
        def __init__(self, k: int) -> None:
            self.k, self.calls = k, 0

        def map(self, raw: np.ndarray) -> np.ndarray:
            self.calls += 1
            return raw + self.k

    one, two = Shift(1000), Shift(2000)
    assert cat.table_rows(one) is cat.table_rows(one) and one.calls == 1  # kept
    assert cat.table_rows(two).tolist() == (cat.values + 2000).tolist() and two.calls == 1  # another vocabulary
    lengths, rows = cat.lookup(lengths_n, items, 4, cat.table_rows(one))
    assert rows.tolist() == (cat.lookup(lengths_n, items, 4)[1] + 1000).tolist()


@pytest.mark.parametrize("limit", [10_000, 25])
def test_builder_keeps_the_earliest_row_and_its_limit(limit: int) -> None:
    """Two "ranks" compacting every few units (the per-rank cap applies mid-stream with limit 25)."""
    rng = np.random.default_rng(3)
    parts = [CatalogBuilder(limit, compact_every=60), CatalogBuilder(limit, compact_every=60)]
    ref: dict[int, list[int]] = {}
    order: list[int] = []
    for unit in range(40):  # units dealt to two "ranks" like the reader's stride
        items = rng.integers(0, 300, 50)
        lens = rng.integers(0, 3, 50)
        values = rng.integers(0, 1000, int(lens.sum()))
        offs = np.concatenate([[0], np.cumsum(lens)])
        for r, it in enumerate(items.tolist()):
            if it not in ref:
                ref[it] = values[offs[r] : offs[r + 1]].tolist()
                order.append(it)
        parts[unit % 2].add(unit, items, None, lens, values)
    merged = CatalogBuilder.merge([p.finish() for p in parts], limit)
    assert _as_dict(merged) == {it: ref[it] for it in order[:limit]}  # the earliest-seen items, all or 25
    assert merged.capped == (len(order) > limit)


def test_scan_equals_the_reference_and_loader_looks_up_exactly(data) -> None:
    root, cols = data
    features = _features()
    plan = _plan(root, features)
    assert "genre[hist]" not in required_columns(data_config(root), features)
    counts, catalogs = scan_training_rows(plan, features)
    ref = _reference(cols)
    assert _as_dict(catalogs["genre[hist]"]) == ref
    genre_ids = [g for gs in cols["genre"] for g in (gs or [])[-GENRES:]]
    assert counts["genre"].total == len(genre_ids)  # the derived feature counts nothing of its own
    with pytest.raises(ValueError, match=r"feature 'genre\[hist\]' needs its item catalogue"):
        build_vocabs(features, counts)
    vocabs = build_vocabs(features, counts, catalogs)
    resolve_sizes(features, vocabs)
    loader = ordered_loader(plan, root, features, vocabs)
    got_values, got_lengths = [], []
    for batch in loader:
        kjt = batch.sparse.to_dict()["genre[hist]"]
        got_values.append(kjt.values().numpy())
        got_lengths.append(kjt.lengths().numpy()[: int((batch.weights > 0).sum())])
    want = [[g for it in h[-HIST:] for g in ref.get(it, [])][-OUT:] for h in cols["hist"]]
    assert np.concatenate(got_lengths).tolist() == [len(w) for w in want]
    flat = np.array([g for w in want for g in w], np.int64)
    assert np.array_equal(np.concatenate(got_values), vocabs["genre"].map(flat))
    assert any(len(h) > HIST for h in cols["hist"]) and any(len(w) == OUT for w in want)  # both truncations ran


def test_the_catalogue_reads_the_carve_and_the_counts_do_not(data) -> None:
    root, cols = data
    features = _features()
    head, tail = carve_tail(_plan(root, features), 0.3)
    n = head.num_rows
    counts, catalogs = scan_training_rows(head, features, carve=tail)
    assert _as_dict(catalogs["genre[hist]"]) == _reference(cols)  # every row, the carve's latest items too
    first = {k: cols[k][:n] for k in cols}
    assert _as_dict(scan_training_rows(head, features)[1]["genre[hist]"]) == _reference(first)
    assert len(_reference(first)) < len(_reference(cols))
    items = [it for it in cols["item"][:n] if it is not None] + [x for h in cols["hist"][:n] for x in h[-HIST:]]
    assert counts["item"].total == len(items)  # ids counted over the rows before the carve only


def test_string_ids_are_hashed_alike_in_the_catalogue_and_the_sequence(tmp_path: Path) -> None:
    f = _features()
    f.sparse = [replace(sf, dtype="string") for sf in f.sparse]
    items = ["a", "b", "a", None, "c", "b"]
    genres = [["x", "y"], ["z"], ["w"], ["q"], None, ["v"]]  # 'a' first showed x y; 'c' has no genres
    hist = [[], ["a"], ["b", "a"], ["c", "d"], None, ["a", "b", "c"]]
    table = pa.table(
        {
            "click": pa.array([0, 1] * 3, pa.int64()),
            "item": pa.array(items, pa.string()),
            "genre": pa.array(genres, pa.list_(pa.string())),
            "hist": pa.array(hist, pa.list_(pa.string())),
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=4)
    plan = _plan(str(tmp_path), f)
    vocabs = build_vocabs(f, *scan_training_rows(plan, f))
    resolve_sizes(f, vocabs)
    loader = ParquetLoader(plan, data_config(str(tmp_path), row_id_column=""), f, rank=0, world_size=1, batch_size=6,
                           seed=0, shuffle=False, drop_last=False, num_workers=0, vocabs=vocabs)  # fmt: skip
    kjt = next(iter(loader)).sparse.to_dict()["genre[hist]"]
    want = [[], ["x", "y"], ["z", "x", "y"], [], [], ["x", "y", "z"]]  # 'c' adds nothing, 'd' is unknown
    assert kjt.lengths().tolist() == [len(w) for w in want]
    raw = hash_strings(pa.array([g for w in want for g in w], pa.string()))[0]
    assert kjt.values().tolist() == vocabs["genre"].map(raw).tolist()


def _two_rank_catalog(root: str) -> dict[int, list[int]]:
    import torch.distributed as dist  # noqa: PLC0415

    from parallel.distributed import all_gather_object  # noqa: PLC0415

    features = _features()
    plan = _plan(root, features)
    _, catalogs = scan_training_rows(plan, features, rank=dist.get_rank(), world_size=2, gather=all_gather_object)
    return _as_dict(catalogs["genre[hist]"])


def test_two_ranks_build_the_same_catalogue(dist_pool, data) -> None:
    root, cols = data
    a, b = dist_pool.run(_two_rank_catalog, root)
    assert a == b == _reference(cols)


def test_round_trip_and_damaged_files(tmp_path: Path, data) -> None:
    root, _ = data
    features = _features()
    vocabs = build_vocabs(features, *scan_training_rows(_plan(root, features), features))
    save_vocabs(tmp_path / "v.npz", vocabs)
    back = load_vocabs(tmp_path / "v.npz", features)
    assert _as_dict(back["genre"].catalogs["genre[hist]"]) == _as_dict(vocabs["genre"].catalogs["genre[hist]"])
    plain = {t: replace(v, catalogs={}) for t, v in vocabs.items()}
    save_vocabs(tmp_path / "old.npz", plain)
    with pytest.raises(DataError, match=r"old.npz: no item catalogue for feature 'genre\[hist\]'"):
        load_vocabs(tmp_path / "old.npz", features)
    cat = vocabs["genre"].catalogs["genre[hist]"]
    broken = {
        **vocabs,
        "genre": replace(vocabs["genre"], catalogs={"genre[hist]": replace(cat, values=cat.values[:-1])}),
    }
    save_vocabs(tmp_path / "bad.npz", broken)
    with pytest.raises(DataError, match="bad.npz: the item catalogue of feature 'genre\\[hist\\]' is inconsistent"):
        load_vocabs(tmp_path / "bad.npz", features)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: replace(f, item_id=""), "'features.item_id' must name a scalar sparse feature"),
        (lambda f: _swap(f, 0, max_len=2), "'features.item_id' must name a scalar sparse feature"),
        (lambda f: replace(f, dense=["len(genre[hist])"]), r"len\(\) counts a list column of the files"),
        (lambda f: _swap(f, 2, max_len=1), "'hist' must be a list feature"),
        (lambda f: _swap(f, 2, table="other"), "the ids of 'hist' must be items like 'item'"),
        (lambda f: _swap(f, 3, name="item[hist]", table="item"), "must be an attribute feature"),
        (lambda f: _swap(f, 3, name="color[hist]"), "'color' must be an attribute feature"),
        (lambda f: _swap(f, 3, table="other"), "must share 'genre'.s table, id_mapping and dtype"),
        (lambda f: _swap(f, 3, oov_dropout=0.1), "set no oov_dropout on it"),
    ],
)
def test_config_errors_name_the_key(change, message) -> None:
    with pytest.raises(ConfigError, match=message):
        change(_features()).validate()


def test_only_sparse_names_are_rewritten_to_their_sequence() -> None:
    assert physical_columns(["price[usd]", "len(hist)"]) == ["price[usd]", "hist"]  # a dense name stays itself
    assert sparse_columns(["genre[hist]", "hist", "item"]) == ["hist", "item"]


def test_hash_mapping_is_refused() -> None:
    f = _features()
    f.sparse = [replace(sf, id_mapping="hash", vocab_size=100) if sf.table_name == "genre" else sf for sf in f.sparse]
    with pytest.raises(ConfigError, match=r"features.sparse\[3\].id_mapping' = 'hash'.*needs \"vocab\""):
        f.validate()


def _swap(f: FeaturesConfig, i: int, **kw) -> FeaturesConfig:
    f.sparse[i] = replace(f.sparse[i], **kw)
    return f
