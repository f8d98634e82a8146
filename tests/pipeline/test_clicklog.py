"""The time-ordered click log (pipeline.tools.clicklog) and the MovieLens converter (pipeline.tools.movielens):
schema, determinism, the time split, exact histories against a Python reference, cold start, AUC ordering."""

from __future__ import annotations

import math
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from config import load_config
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset
from pipeline.tools import clicklog, movielens
from pipeline.vocab import build_vocabs, resolve_sizes, scan_training_rows

ROWS, HISTORY = 4000, 5


def _read(out: Path) -> tuple[pa.Table, pa.Table]:
    """(train, test) with the files concatenated in file order."""
    return tuple(
        pa.concat_tables(pq.read_table(f) for f in sorted((out / s).glob("part-*.parquet"))) for s in ("train", "test")
    )


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clicklog")
    argv = ["--out", str(out), "--rows", str(ROWS), "--seed", "5", "--files", "3", "--history", str(HISTORY)]
    return out, clicklog.main(argv + ["--row-group-size", "500", "--report"])


def _reference_histories(t: pa.Table, history: int) -> tuple[list[list[int]], list[float]]:
    """Row by row in file order: the user's clicked items among earlier rows, and log1p(earlier rows)."""
    clicked: dict[int, deque] = defaultdict(lambda: deque(maxlen=history))
    seen: dict[int, int] = defaultdict(int)
    hist, count = [], []
    for u, i, c in zip(*(t.column(k).to_pylist() for k in ("user_id", "item_id", "click"))):
        hist.append(list(clicked[u]))
        count.append(math.log1p(seen[u]))
        seen[u] += 1
        if c:
            clicked[u].append(i)
    return hist, count


def test_schema_layout_and_row_groups(log):
    out, res = log
    assert len(list((out / "train").glob("part-*.parquet"))) == 3
    assert len(list((out / "test").glob("part-*.parquet"))) == 1
    expected = clicklog.SCHEMA.append(pa.field("oracle_p_click", pa.float32()))
    for f in sorted(out.glob("*/part-*.parquet")):
        meta = pq.ParquetFile(f)
        assert meta.schema_arrow.equals(expected), f
        assert all(meta.metadata.row_group(g).num_rows <= 500 for g in range(meta.num_row_groups))
    train, test = _read(out)
    assert (train.num_rows, test.num_rows) == (res["train_rows"], res["test_rows"]) == (3200, 800)
    both = pa.concat_tables([train, test])
    assert np.array_equal(both.column("row_id").to_numpy(), np.arange(ROWS))
    assert set(np.unique(both.column("click").to_numpy())) == {0, 1}
    genres = both.column("item_genres").to_pylist()
    assert all(1 <= len(g) <= 3 and g == sorted(set(g)) and min(g) >= 1 for g in genres)
    p = both.column("oracle_p_click").to_numpy()
    assert ((p > 0) & (p < 1)).all()
    assert 0.3 < res["report"]["train_click_rate"] < 0.5


def test_time_order_and_split_at_the_boundary(log):
    train, test = _read(log[0])
    ts = np.concatenate([train.column("ts").to_numpy(), test.column("ts").to_numpy()])
    assert (np.diff(ts) >= 0).all()
    assert train.column("ts").to_numpy().max() <= test.column("ts").to_numpy().min()
    assert test.num_rows == round(ROWS * 0.2)


def test_deterministic_by_seed_and_independent_of_files(tmp_path):
    for name, seed, files in (("a", 1, 2), ("b", 1, 2), ("c", 1, 5), ("d", 2, 2)):
        clicklog.main(["--out", str(tmp_path / name), "--rows", "3000", "--seed", str(seed), "--files", str(files)])
    a, b, c, d = (pa.concat_tables(_read(tmp_path / x)) for x in "abcd")
    assert a.equals(b) and a.equals(c)
    assert not a.column("click").equals(d.column("click"))
    files_a = sorted((tmp_path / "a").glob("*/part-*.parquet"))
    files_b = sorted((tmp_path / "b").glob("*/part-*.parquet"))
    assert [f.read_bytes() for f in files_a] == [f.read_bytes() for f in files_b]


def test_histories_are_earlier_clicks_of_the_same_user(log):
    both = pa.concat_tables(_read(log[0]))
    hist, count = _reference_histories(both, HISTORY)
    assert both.column("hist_items").to_pylist() == hist
    np.testing.assert_allclose(both.column("hist_count").to_numpy(), np.array(count, dtype=np.float32))
    assert max(len(h) for h in hist) == HISTORY
    # the vectorised rebuild from the labels (the converter's path) agrees with the generator's loop
    cols = [both.column(k).to_numpy() for k in ("user_id", "item_id", "click")]
    assert clicklog.histories(*cols, HISTORY).to_pylist() == hist


def test_cold_start_users_and_items_in_test(log):
    r = log[1]["report"]
    assert 0.0 < r["test_unseen_user_share"] < 0.5
    assert 0.0 < r["test_unseen_item_share"] < 0.5


def test_oracle_beats_popularity_beats_chance(tmp_path):
    res = clicklog.main(["--out", str(tmp_path), "--rows", "60000", "--seed", "0", "--report"])["report"]
    assert 0.74 < res["test_oracle_auc"] < 0.83 and 0.74 < res["train_oracle_auc"] < 0.83
    assert 0.53 < res["test_popularity_auc"] < res["test_oracle_auc"] - 0.1


def test_recsys_config_reads_the_log(log):
    cfg = load_config(["--config", "configs/recsys.toml"])
    plan = plan_dataset(str(log[0] / "test"), cfg.data, cfg.features)  # raises DataError on any mismatch
    vocabs = build_vocabs(cfg.features, *scan_training_rows(plan, cfg.features))  # vocabularies and catalogue
    resolve_sizes(cfg.features, vocabs)
    loader = ParquetLoader(
        plan, cfg.data, cfg.features, rank=0, world_size=1, batch_size=64, seed=0, shuffle=True, drop_last=True,
        num_workers=0, vocabs=vocabs,
    )  # fmt: skip
    b = next(iter(loader))
    assert b.labels.shape == (64, 1) and b.dense.shape == (64, 2)  # hist_count, len(hist_items)
    hist = b.sparse.to_dict()["hist_items"]
    assert hist.lengths().max() <= HISTORY
    assert np.array_equal(b.dense[:, 1].numpy(), hist.lengths().numpy())  # histories are never longer than max_len
    genres = b.sparse.to_dict()["item_genres[hist_items]"]  # 1-3 genres per catalogued item of the history
    assert genres.lengths().sum() > 0 and np.all(genres.lengths().numpy() <= 3 * hist.lengths().numpy())


# --- MovieLens: a hand-written GroupLens fixture ------------------------------------------------------------

# user, item, rating, ts: ties in ts (kept in file order), a user with no clicks, users first seen late
U_DATA = [
    (1, 10, 5, 100), (2, 11, 3, 100), (1, 11, 4, 105), (1, 12, 2, 103), (3, 10, 4, 101), (1, 13, 5, 110),
    (2, 10, 5, 110), (1, 10, 4, 120), (2, 12, 1, 111), (1, 11, 5, 125), (3, 13, 1, 130), (4, 10, 5, 131),
    (1, 12, 4, 140), (2, 13, 4, 140), (5, 14, 5, 150), (1, 14, 3, 151), (4, 11, 4, 152), (1, 10, 5, 160),
    (3, 11, 4, 161), (5, 10, 2, 170),
]  # fmt: skip
U_USER = ["1|24|M|technician|85711", "2|53|F|other|94043", "3|23|M|writer|32067", "4|24|M|student|43537",
          "5|33|F|none|15213"]  # fmt: skip
ITEM_FLAGS = {10: (3, 4, 5), 11: (1,), 12: (8, 14), 13: (), 14: (0,)}
ITEM_DATES = {10: "01-Jan-1995", 11: "01-Jan-1995", 12: "", 13: "16-Sep-1996", 14: "01-Jan-1977"}


def _write_grouplens(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in U_DATA))
    (d / "u.user").write_text("\n".join(U_USER) + "\n")
    lines = []
    for i, flags in ITEM_FLAGS.items():
        bits = "|".join("1" if g in flags else "0" for g in range(len(movielens.GENRES)))
        lines.append(f"{i}|Caf\xe9 {i} (1995)|{ITEM_DATES[i]}||http://x|{bits}")
    (d / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


def _write_widedeep(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    cols = list(zip(*U_DATA))
    data = pa.table({k: pa.array(v, pa.int64()) for k, v in zip(("user_id", "movie_id", "rating", "timestamp"), cols)})
    pq.write_table(data, d / movielens.WIDEDEEP["data"], compression="brotli")
    users = [dict(zip(("user_id", "age", "gender", "occupation", "zip_code"), s.split("|"))) for s in U_USER]
    for r in users:
        r["user_id"], r["age"] = int(r["user_id"]), int(r["age"])
    pq.write_table(pa.Table.from_pylist(users), d / movielens.WIDEDEEP["users"], compression="brotli")
    items = [
        {"movie_id": i, "release_date": ITEM_DATES[i] or None}
        | {g: int(k in f) for k, g in enumerate(movielens.GENRES)}
        for i, f in ITEM_FLAGS.items()
    ]
    pq.write_table(pa.Table.from_pylist(items), d / movielens.WIDEDEEP["items"], compression="brotli")


@pytest.mark.parametrize("threshold", [4, 3])
def test_movielens_labels_split_and_histories(tmp_path, threshold):
    _write_grouplens(tmp_path / "src")
    out = tmp_path / "out"
    res = movielens.main(["--src", str(tmp_path / "src"), "--out", str(out), "--threshold", str(threshold)]
                         + ["--history", "3", "--report"])  # fmt: skip
    train, test = _read(out)
    assert (train.num_rows, test.num_rows) == (16, 4) == (res["train_rows"], res["test_rows"])
    order = sorted(range(len(U_DATA)), key=lambda r: (U_DATA[r][3], r))
    both = pa.concat_tables([train, test])
    assert both.column("row_id").to_pylist() == order
    assert both.column("ts").to_pylist() == [U_DATA[r][3] for r in order]
    assert both.column("click").to_pylist() == [int(U_DATA[r][2] >= threshold) for r in order]
    assert both.column("item_genres").to_pylist() == [sorted(ITEM_FLAGS[U_DATA[r][1]]) or [0] for r in order]
    years = {10: 1995, 11: 1995, 12: 0, 13: 1996, 14: 1977}
    assert both.column("item_year").to_pylist() == [years[U_DATA[r][1]] for r in order]
    attrs = {int(s.split("|")[0]): s.split("|") for s in U_USER}
    assert both.column("user_age").to_pylist() == [int(attrs[U_DATA[r][0]][1]) for r in order]
    assert both.column("user_gender").to_pylist() == [{"M": 0, "F": 1}[attrs[U_DATA[r][0]][2]] for r in order]
    occ = [movielens.OCCUPATIONS.index(attrs[U_DATA[r][0]][3]) for r in order]
    assert both.column("user_occupation").to_pylist() == occ
    hist, count = _reference_histories(both, 3)
    assert both.column("hist_items").to_pylist() == hist
    np.testing.assert_allclose(both.column("hist_count").to_numpy(), np.array(count, dtype=np.float32))
    if threshold == 4:  # hand-checked: user 1's 6th row (ts 125) saw clicks 10, 11, 13, 10 -> the last 3
        assert hist[order.index(9)] == [11, 13, 10]
    assert res["report"]["test_unseen_user_share"] == 0.0 and res["report"]["test_unseen_item_share"] == 0.0


def test_movielens_widedeep_parquet_reads_the_same(tmp_path):
    _write_grouplens(tmp_path / "gl")
    _write_widedeep(tmp_path / "wd")
    assert movielens.convert(tmp_path / "gl").equals(movielens.convert(tmp_path / "wd"))


def test_movielens_errors_name_the_file(tmp_path):
    with pytest.raises(movielens.MovieLensError, match="u.data"):
        movielens.convert(tmp_path)
    _write_grouplens(tmp_path)
    (tmp_path / "u.user").write_text("\n".join(U_USER[:-1]) + "\n")
    with pytest.raises(movielens.MovieLensError, match="user id.*e.g. 5"):
        movielens.convert(tmp_path)
    (tmp_path / "u.item").unlink()
    with pytest.raises(movielens.MovieLensError, match="missing u.item"):
        movielens.convert(tmp_path)
