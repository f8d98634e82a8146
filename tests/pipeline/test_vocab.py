"""Id vocabularies: counts exact against numpy (1 and 2 ranks), the sketch beyond the exact limit, the
id -> row mapping (min_count, OOV buckets, caps), the file round trip, and the loader's batches."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import FeaturesConfig, SparseFeature
from pipeline.errors import DataError
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset
from pipeline.vocab import IdCounts, build_vocabs, load_vocabs, resolve_sizes, save_vocabs, scan_training_rows
from schema import ConfigError
from tests.pipeline.fixtures import data_config, ordered_loader

N_FILES, ROWS, RG, MAX_LEN = 3, 2000, 450, 4


def _features(min_count: int = 2, oov: int = 1, vocab_size: int | str = "auto") -> FeaturesConfig:
    """item (scalar) and hist (list) share table 'item'; user has its own; tag is a string id."""
    kw = dict(id_mapping="vocab", vocab_size=vocab_size, min_count=min_count, oov_buckets=oov)
    return FeaturesConfig(
        labels=["click"],
        user_id="",
        sparse=[
            SparseFeature(name="user", group="user", **kw),
            SparseFeature(name="item", group="item", table="item", **kw),
            SparseFeature(name="hist", group="sequence", table="item", max_len=MAX_LEN, **kw),
            SparseFeature(name="tag", group="item", dtype="string", **kw),
        ],
    )  # fmt: skip


def _columns(seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    n = N_FILES * ROWS
    user = rng.zipf(1.3, n).astype(np.int64) - 5  # negative and huge ids too
    user[::97] = 2**62 + 11
    item = rng.zipf(1.5, n).astype(np.int64)
    lens = rng.integers(0, 7, n)  # some longer than MAX_LEN: truncated to the last MAX_LEN
    hist = [rng.zipf(1.5, k).astype(np.int64).tolist() for k in lens]
    tag = [f"t{x}" for x in rng.zipf(1.6, n)]
    return {"click": (np.arange(n) % 2).astype(np.int64), "user": user, "item": item, "hist": hist, "tag": tag}


def _write(root: Path, cols: dict[str, object]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(N_FILES):
        sl = slice(i * ROWS, (i + 1) * ROWS)
        table = pa.table(
            {
                "click": pa.array(cols["click"][sl]),  # type: ignore[index]
                "user": pa.array(cols["user"][sl]),  # type: ignore[index]
                "item": pa.array(cols["item"][sl]),  # type: ignore[index]
                "hist": pa.array(cols["hist"][sl], pa.list_(pa.int64())),  # type: ignore[index]
                "tag": pa.array(cols["tag"][sl]),  # type: ignore[index]
            }
        )
        pq.write_table(table, root / f"part-{i}.parquet", row_group_size=RG)
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, dict[str, object]]:
    cols = _columns()
    return _write(tmp_path_factory.mktemp("vocab"), cols), cols


def _numpy_counts(cols: dict[str, object], features: FeaturesConfig) -> dict[str, dict[int, int]]:
    from pipeline.ids import hash_strings  # noqa: PLC0415

    item = np.concatenate([cols["item"], *[np.array(h[-MAX_LEN:], np.int64) for h in cols["hist"]]])  # type: ignore[arg-type]
    tag, _ = hash_strings(pa.array(cols["tag"]))
    out = {}
    for name, ids in {"user": cols["user"], "item": item, "tag": tag}.items():
        u, c = np.unique(np.asarray(ids), return_counts=True)
        out[name] = dict(zip(u.tolist(), c.tolist()))
    return out


def _plan(root: str, features: FeaturesConfig):
    return plan_dataset(root, data_config(root, row_id_column=""), features)


def test_counts_and_vocabulary_equal_numpy(data) -> None:
    root, cols = data
    features = _features(min_count=3)
    counts = scan_training_rows(_plan(root, features), features)[0]
    ref = _numpy_counts(cols, features)
    for table, want in ref.items():
        c = counts[table]
        assert c.exact and dict(zip(c.ids.tolist(), c.counts.tolist())) == want, table
    vocabs = build_vocabs(features, counts)
    for table, want in ref.items():
        kept = sorted(k for k, v in want.items() if v >= 3)
        assert vocabs[table].ids.tolist() == kept
        assert vocabs[table].oov_total == sum(v for v in want.values() if v < 3)
    resolve_sizes(features, vocabs)
    assert [sf.vocab_size for sf in features.sparse] == [
        vocabs["user"].size, vocabs["item"].size, vocabs["item"].size, vocabs["tag"].size
    ]  # fmt: skip


def _two_rank_counts(root: str) -> dict[str, tuple[list[int], list[int]]]:
    import torch.distributed as dist  # noqa: PLC0415

    from parallel.distributed import all_gather_object  # noqa: PLC0415

    features = _features()
    plan = _plan(root, features)
    counts = scan_training_rows(plan, features, rank=dist.get_rank(), world_size=2, gather=all_gather_object)[0]
    return {t: (c.ids.tolist(), c.counts.tolist()) for t, c in counts.items()}


def test_two_ranks_count_like_one(dist_pool, data) -> None:
    root, _ = data
    features = _features()
    counts = scan_training_rows(_plan(root, features), features)[0]
    one = {t: (c.ids.tolist(), c.counts.tolist()) for t, c in counts.items()}
    a, b = dist_pool.run(_two_rank_counts, root)
    assert a == b == one


def test_sketch_beyond_the_exact_limit_keeps_the_heavy_hitters() -> None:
    rng = np.random.default_rng(1)
    ids = rng.zipf(1.2, 200_000).astype(np.int64)
    u, true = np.unique(ids, return_counts=True)
    c = IdCounts(limit=500, width=1 << 14)
    for part in np.array_split(ids, 40):
        c.add(part)
    c.finish()
    assert not c.exact and len(c.ids) == 500
    est = dict(zip(c.ids.tolist(), c.counts.tolist()))
    truth = dict(zip(u.tolist(), true.tolist()))
    assert all(est[k] >= truth[k] for k in est)  # count-min never under-counts
    top = u[np.argsort(-true, kind="stable")][:100]  # the 100 most frequent ids are all tracked
    assert set(top.tolist()) <= set(est)
    bound = np.e / (1 << 14) * ids.size  # e / width x total, per the count-min guarantee (w.h.p.)
    assert max(est[k] - truth[k] for k in top.tolist()) <= bound
    halves = [IdCounts(500, 1 << 14), IdCounts(500, 1 << 14)]
    for i, part in enumerate(np.array_split(ids, 40)):
        halves[i % 2].add(part)
    merged = IdCounts.merge([h.finish() for h in halves])
    assert np.array_equal(merged.sketch, c.sketch)  # sketches add exactly


def test_mapping_min_count_oov_buckets_and_cap() -> None:
    counts = IdCounts(limit=100, width=64)
    counts.add(np.array([5, 5, 5, 9, 9, 2, 7, 7, 7, 7, -3, -3], np.int64))
    f = FeaturesConfig(
        labels=["y"], user_id="", sparse=[SparseFeature(name="x", id_mapping="vocab", vocab_size="auto")]
    )
    v = build_vocabs(f, {"x": counts.finish()})["x"]
    assert v.ids.tolist() == [-3, 5, 7, 9] and v.size == 5
    rows = v.map(np.array([5, 7, 2, 123, -3, 9], np.int64))
    assert rows.tolist() == [2, 3, 0, 0, 1, 4]  # kept: 1 + rank; rare (2) and unseen (123): row 0
    f.sparse[0] = replace(f.sparse[0], oov_buckets=4)
    v4 = build_vocabs(f, {"x": counts})["x"]
    r = v4.map(np.arange(1000, 1100, dtype=np.int64))
    assert r.min() >= 0 and r.max() < 4 and len(set(r.tolist())) == 4  # unseen ids spread over 4 OOV rows
    assert v4.map(np.array([5], np.int64)).tolist() == [4 + 1]
    f.sparse[0] = replace(f.sparse[0], oov_buckets=1, vocab_size=3)  # cap: the 2 most frequent ids (7: 4, 5: 3)
    assert build_vocabs(f, {"x": counts})["x"].ids.tolist() == [5, 7]


def test_file_round_trip_and_errors(tmp_path: Path, data) -> None:
    root, _ = data
    features = _features()
    vocabs = build_vocabs(features, scan_training_rows(_plan(root, features), features)[0])
    save_vocabs(tmp_path / "vocab.npz", vocabs)
    back = load_vocabs(tmp_path / "vocab.npz", features)
    for t, v in vocabs.items():
        assert np.array_equal(back[t].ids, v.ids) and back[t].summary() == v.summary()
    with pytest.raises(DataError, match="missing.npz"):
        load_vocabs(tmp_path / "missing.npz", features)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz: cannot read the id vocabularies"):
        load_vocabs(tmp_path / "bad.npz", features)
    save_vocabs(tmp_path / "part.npz", {"user": vocabs["user"]})
    with pytest.raises(DataError, match="no vocabulary for table 'item'"):
        load_vocabs(tmp_path / "part.npz", features)


def test_loader_maps_ids_through_the_vocabulary(data) -> None:
    root, cols = data
    features = _features(min_count=2)
    plan = _plan(root, features)
    vocabs = build_vocabs(features, scan_training_rows(plan, features)[0])
    resolve_sizes(features, vocabs)
    with pytest.raises(ValueError, match="need the vocabularies"):
        ParquetLoader(plan, data_config(root, row_id_column=""), features, rank=0, world_size=1, batch_size=500,
                      seed=0, shuffle=False, drop_last=False, num_workers=0)  # fmt: skip
    loader = ordered_loader(plan, root, features, vocabs)
    got_user, got_hist = [], []
    for batch in loader:
        d = batch.sparse.to_dict()
        got_user.append(d["user"].values().numpy())
        got_hist.append(d["hist"].values().numpy())
    want_hist = np.concatenate([np.array(h[-MAX_LEN:], np.int64) for h in cols["hist"]])  # type: ignore[union-attr]
    assert np.array_equal(np.concatenate(got_user), vocabs["user"].map(cols["user"]))  # type: ignore[arg-type]
    assert np.array_equal(np.concatenate(got_hist), vocabs["item"].map(want_hist))
    assert np.concatenate(got_user).max() < features.sparse[0].vocab_size


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"vocab_size' = \"auto\" needs id_mapping = \"vocab\""):
        FeaturesConfig(labels=["y"], sparse=[SparseFeature(name="x", vocab_size="auto")]).validate()
    with pytest.raises(ConfigError, match="min_count"):
        FeaturesConfig(labels=["y"], sparse=[SparseFeature(name="x", id_mapping="vocab", min_count=0)]).validate()
    with pytest.raises(ConfigError, match="one vocabulary per table"):
        FeaturesConfig(
            labels=["y"],
            sparse=[
                SparseFeature(name="a", table="t", id_mapping="vocab", vocab_size=10),
                SparseFeature(name="b", table="t", id_mapping="hash", vocab_size=10),
            ],
        ).validate()
    with pytest.raises(ConfigError, match="leaves no row beyond"):
        FeaturesConfig(
            labels=["y"], sparse=[SparseFeature(name="x", id_mapping="vocab", vocab_size=2, oov_buckets=2)]
        ).validate()


def test_oov_dropout_is_deterministic_and_only_in_training(data) -> None:
    root, cols = data
    features = _features(min_count=2)
    features.sparse[0] = replace(features.sparse[0], oov_dropout=0.5)
    plan = _plan(root, features)
    vocabs = build_vocabs(features, scan_training_rows(plan, features)[0])
    resolve_sizes(features, vocabs)

    def users(train: bool, seed: int = 0) -> np.ndarray:
        loader = ParquetLoader(
            plan, data_config(root, row_id_column="", shuffle_window=500), features, rank=0, world_size=1,
            batch_size=500, seed=seed, shuffle=False, drop_last=False, num_workers=0, vocabs=vocabs, train=train,
        )  # fmt: skip
        return np.concatenate([b.sparse.to_dict()["user"].values().numpy() for b in loader])

    clean, a, b = users(False), users(True), users(True)
    assert np.array_equal(a, b)  # the same drops on every run (no random state)
    assert np.array_equal(clean, vocabs["user"].map(cols["user"]))  # evaluation loaders never drop
    dropped = (a != clean) | ((a == 0) & (clean == 0))
    share = ((a == 0) & (clean != 0)).sum() / max((clean != 0).sum(), 1)
    assert 0.45 < share < 0.55 and np.all(a[a != clean] == 0) and dropped.any()  # dropped ids -> OOV row 0
    assert not np.array_equal(users(True, seed=1), a)  # other seed, other drops
    with pytest.raises(ConfigError, match="oov_dropout"):
        FeaturesConfig(labels=["y"], sparse=[SparseFeature(name="x", oov_dropout=0.2)]).validate()
