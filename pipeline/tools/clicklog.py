"""A time-ordered, id-heavy click log with a planted preference model (the oracle AUC is known).

    python -m pipeline.tools.clicklog --out data/clicklog --rows 200000 --seed 0 --report

writes DIR/train/part-NNNNN.parquet (--files files, contiguous in time) and DIR/test/part-NNNNN.parquet:
the rows sorted by time, the first (1 - --test-fraction) of them to train, the rest to test (a global
time split, so every test row is later than every train row; the last 10% of train rows in file order
are the latest ones: a time-ordered validation carve). Row groups of --row-group-size rows, zstd, page
checksums. Same seed and rows: same bytes, whatever --files is. Schema (shared with
`pipeline.tools.movielens`, so `configs/recsys.toml` trains on either):

    row_id int64 (unique; position in time order), ts int64 (event time, seconds)
    user_id, item_id int64      (auto-increment in order of appearance in the world, from 1)
    user_age int64 (13..75), user_gender int64 (0/1), user_occupation int64 (0..20)
    item_year int64 (release year), item_genres list<int64> (1..3 codes in 1..18, ascending)
    hist_items list<int64>      the user's previously clicked items (strictly earlier rows), most
                                recent last, at most --history
    hist_count float32          log1p(number of the user's earlier rows, clicked or not)
    click int64 (0/1); oracle_p_click float32 (the true probability: never a feature)

World (sizes scale with --rows: rows / 8 users, rows / 25 items, both >= 50). Time t runs over [0, 1)
(90 days of seconds from 2023-11-14). Users: Zipf-Mandelbrot weights 1 / (rank + 20)^1.05 (ranks
shuffled), 40% alive from the start, the others born uniformly over [0, 1); an event's user is drawn among
the born users by weight. Items: weights 1 / (rank + 10)^1.1, 50% a back catalogue born in [-1, 0), the
rest born uniformly over [0, 1); exposure = weight x exp(-(t - birth) / 0.5): popularity decays with age,
so the popular items change over time (the relative weights of born items are then time-invariant, so
drawing from the born prefix in birth order is exact and vectorised). Exposure does not depend on the
user. New users and items appear all the time: the test period holds users and items never seen in train.
Attributes: age ~ N(33, 12) clipped to 13..75, gender 1 with probability 0.3, occupation Zipf over 21
codes; 1-3 genres per item (Zipf(0.9) over 18, without replacement), release year 2024 - floor(Exp(0.7))
for new items and 2024 - floor(Exp(12)) (>= 1920) for the catalogue.

Preference model (D = 8 latent dims; age buckets 13-17, 18-24, 25-34, 35-44, 45-49, 50-55, 56+;
std(x) = standardized over the log's rows, so a term's scale does not hang on a few random draws):

    taste_u  = age[bucket] + gender[g] + occupation[o] + individual_u        user attributes -> taste
    vec_i    = mean(genre[g] for g in genres_i) + year_dir * year_z + individual_i
    q_i      = 0.5 std(log weight_i) + 0.87 N(0, 1)                         quality, tied to popularity
    z = -0.45 + 0.8 std(q_i) + 0.5 exp(-(t - birth_i) / 0.1)                 item quality(t): novelty boost
        + bias_u + 0.7 std(<taste_u, vec_i>)                                 bias_u ~ N(0, 0.4^2)
        + 2.5 (affinity - 0.3) [hist_items not empty]                        history term
    affinity = mean over the candidate's genres of the share of the row's hist_items with that genre

oracle_p_click = sigmoid(z); click ~ Bernoulli. The history term makes labels depend on earlier labels,
so they are drawn in steps over each user's k-th row (vectorised across users, a Python loop over k);
it uses the row's own hist_items, so --history changes the model too (its window is the feature's).
Measured on `--rows 200000 --seed 0 --report` (see `report`): click rate 0.39 (train) / 0.38 (test),
oracle AUC 0.787 / 0.788 (0.764 without the history term), popularity prior (item click count in train,
scored on test) 0.613; 11.5% of test rows have a user and 18.2% an item never seen in train. 200k rows
in ~0.7 s, 2M rows in 8-16 s (2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tools.synth import auc

T0, SPAN = 1_700_000_000, 90 * 86_400  # start of the log (unix seconds) and its length
D, N_GENRES, N_OCC = 8, 18, 21
TAU, TAU_FRESH = 0.5, 0.1  # decay of an item's exposure and of its novelty boost, in units of the log's span
AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("ts", pa.int64()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("user_age", pa.int64()),
        ("user_gender", pa.int64()),
        ("user_occupation", pa.int64()),
        ("item_year", pa.int64()),
        ("item_genres", pa.list_(pa.int64())),
        ("hist_items", pa.list_(pa.int64())),
        ("hist_count", pa.float32()),
        ("click", pa.int64()),
    ]
)
"""The shared click-log schema (`pipeline.tools.movielens` writes it too); the generator adds oracle_p_click."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _standardize(x: np.ndarray) -> np.ndarray:
    """Mean 0, sd 1 over the log's rows: the scale of a term then does not hang on a few random draws."""
    return (x - x.mean()) / max(float(x.std()), 1e-12)


def _zipf_weights(rng: np.random.Generator, n: int, a: float, shift: float) -> np.ndarray:
    """n weights 1 / (rank + shift)^a with the ranks in random order."""
    return 1.0 / (rng.permutation(n) + shift) ** a


def _draw_born(rng: np.random.Generator, birth: np.ndarray, weight: np.ndarray, t: np.ndarray) -> np.ndarray:
    """For each time t, an entity with birth <= t drawn by weight. `birth` is sorted ascending and
    birth[0] <= t.min(), so the born entities are a prefix and one searchsorted draws them all."""
    cum = np.cumsum(weight)
    alive = np.searchsorted(birth, t, side="right")
    pick = np.searchsorted(cum, rng.random(len(t)) * cum[alive - 1], side="right")
    return np.minimum(pick, alive - 1)


def _users(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """User table in birth order (user index = id - 1)."""
    born = np.where(rng.random(n) < 0.4, -rng.random(n), rng.random(n))
    born.sort()
    age = np.clip(np.rint(rng.normal(33.0, 12.0, n)), 13, 75).astype(np.int64)
    gender = (rng.random(n) < 0.3).astype(np.int64)
    occ_p = 1.0 / np.arange(1, N_OCC + 1) ** 0.8
    occ = rng.choice(N_OCC, n, p=occ_p / occ_p.sum())
    s = 1.0 / D**0.25  # component scale: <taste, vec> then has variance ~1
    age_emb = rng.normal(0.0, s * 0.55, (len(AGE_EDGES) + 1, D))
    gender_emb = rng.normal(0.0, s * 0.45, (2, D))
    occ_emb = rng.normal(0.0, s * 0.4, (N_OCC, D))
    taste = age_emb[np.digitize(age, AGE_EDGES)] + gender_emb[gender] + occ_emb[occ] + rng.normal(0.0, s * 0.6, (n, D))
    return {
        "born": born,
        "weight": _zipf_weights(rng, n, 1.05, 20.0),
        "age": age,
        "gender": gender,
        "occupation": occ,
        "taste": taste,
        "bias": rng.normal(0.0, 0.4, n),
    }


def _items(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Item table in birth order (item index = id - 1); genres as an n x (N_GENRES + 1) 0/1 matrix."""
    born = np.where(rng.random(n) < 0.5, -rng.random(n), rng.random(n))
    born.sort()
    weight = _zipf_weights(rng, n, 1.1, 10.0)
    genre_p = 1.0 / np.arange(1, N_GENRES + 1) ** 0.9
    keys = np.log(genre_p)[None, :] + rng.gumbel(size=(n, N_GENRES))  # Gumbel top-k: k genres w/o replacement
    top = np.argsort(-keys, axis=1)
    k = rng.choice([1, 2, 3], n, p=[0.5, 0.35, 0.15])
    multihot = np.zeros((n, N_GENRES + 1), dtype=np.float64)
    rows, cols = np.nonzero(np.arange(N_GENRES)[None, :] < k[:, None])
    multihot[rows, 1 + top[rows, cols]] = 1.0
    release = 2024 - np.floor(rng.exponential(np.where(born < 0, 12.0, 0.7))).astype(np.int64)
    year = np.maximum(release, 1920)
    s = 1.0 / D**0.25
    genre_emb = rng.normal(0.0, s * 0.75, (N_GENRES + 1, D))
    year_z = np.clip((year - 2005) / 15.0, -3.0, 1.5)
    vec = (multihot @ genre_emb) / k[:, None] + np.outer(year_z, rng.normal(0.0, s * 0.3, D))
    vec += rng.normal(0.0, s * 0.55, (n, D))
    lw = np.log(weight)
    q = 0.5 * (lw - lw.mean()) / lw.std() + math.sqrt(0.75) * rng.standard_normal(n)
    return {"born": born, "weight": weight, "genres": multihot, "n_genres": k, "year": year, "vec": vec, "q": q}


def _label_steps(
    user: np.ndarray,
    item: np.ndarray,
    base: np.ndarray,
    uniform: np.ndarray,
    genres: np.ndarray,
    history: int,
    n_users: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw the labels row by row in each user's time order, keeping each user's last `history` clicks.

    Args:
        user, item: N 0-based indices of the rows (in time order); base: N logits without the history term.
        uniform: N uniforms for the Bernoulli draws; genres: items x (N_GENRES + 1) 0/1 matrix.
    Returns:
        (click N bool, p N, hist N x history item indices right-aligned and -1 padded, hist_len N).
    """
    n = len(user)
    k = rank_within_user(user)
    by_k = np.argsort(k, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(k))])
    buf = np.full((n_users, history), -1, dtype=np.int64)
    n_clicked = np.zeros(n_users, dtype=np.int64)
    counts = np.zeros((n_users, genres.shape[1]), dtype=np.float64)  # genre counts of the buffered items
    click, p = np.zeros(n, dtype=bool), np.zeros(n)
    hist, hist_len = np.full((n, history), -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for step in range(len(bounds) - 1):
        idx = by_k[bounds[step] : bounds[step + 1]]
        u, it = user[idx], item[idx]
        length = np.minimum(n_clicked[u], history)
        hist[idx], hist_len[idx] = buf[u], length
        share = counts[u] / np.maximum(length, 1)[:, None]
        affinity = (share * genres[it]).sum(1) / genres[it].sum(1)
        p_step = _sigmoid(base[idx] + np.where(length > 0, 2.5 * (affinity - 0.3), 0.0))
        c = uniform[idx] < p_step
        click[idx], p[idx] = c, p_step
        cu, ci = u[c], it[c]
        full = n_clicked[cu] >= history
        counts[cu[full]] -= genres[buf[cu[full], 0]]
        buf[cu] = np.concatenate([buf[cu, 1:], ci[:, None]], axis=1)
        counts[cu] += genres[ci]
        n_clicked[cu] += 1
    return click, p, hist, hist_len


def generate_log(rows: int, seed: int, history: int = 20) -> pa.Table:
    """The whole log in time order as one Arrow table (SCHEMA + oracle_p_click)."""
    if rows < 1 or history < 1:
        raise ValueError(f"need rows >= 1 and history >= 1, got rows={rows}, history={history}")
    rng = np.random.default_rng([seed, 0xC11C])
    users, items = _users(rng, max(50, rows // 8)), _items(rng, max(50, rows // 25))
    t = np.sort(rng.random(rows))
    t = np.maximum(t, max(users["born"][0], items["born"][0]))  # somebody is always alive
    u = _draw_born(rng, users["born"], users["weight"], t)
    i = _draw_born(rng, items["born"], items["weight"] * np.exp((items["born"] - 1.0) / TAU), t)
    fresh = 0.5 * np.exp(-np.maximum(t - items["born"][i], 0.0) / TAU_FRESH)
    dot = np.einsum("nd,nd->n", users["taste"][u], items["vec"][i])
    base = -0.45 + 0.8 * _standardize(items["q"][i]) + fresh + users["bias"][u] + 0.7 * _standardize(dot)
    genres = items["genres"]
    click, p, hist, hist_len = _label_steps(u, i, base, rng.random(rows), genres, history, len(users["born"]))
    g_rows, g_cols = np.nonzero(genres[i])
    live = np.arange(history)[None, :] >= (history - hist_len)[:, None]
    cols = {
        "row_id": np.arange(rows, dtype=np.int64),
        "ts": T0 + np.floor(t * SPAN).astype(np.int64),
        "user_id": u + 1,
        "item_id": i + 1,
        "user_age": users["age"][u],
        "user_gender": users["gender"][u],
        "user_occupation": users["occupation"][u],
        "item_year": items["year"][i],
        "item_genres": list_array(np.bincount(g_rows, minlength=rows), g_cols.astype(np.int64)),
        "hist_items": list_array(hist_len, hist[live] + 1),
        "hist_count": pa.array(np.log1p(rank_within_user(u)).astype(np.float32)),
        "click": click.astype(np.int64),
    }
    table = pa.table(cols, schema=SCHEMA)
    return table.append_column("oracle_p_click", pa.array(p.astype(np.float32)))


def list_array(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """A list<int64> array from N lengths and the concatenated values."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int64()))


def rank_within_user(user: np.ndarray) -> np.ndarray:
    """For N rows in time order, the number of earlier rows of the same user (0 for a user's first row)."""
    order = np.argsort(user, kind="stable")
    k = np.empty(len(user), dtype=np.int64)
    k[order] = np.arange(len(user)) - np.searchsorted(user[order], user[order], side="left")
    return k


def histories(user: np.ndarray, item: np.ndarray, click: np.ndarray, history: int) -> pa.ListArray:
    """hist_items of rows in their final (time) order when the labels are given: for every row the
    user's last `history` clicked items among strictly earlier rows, most recent last. Vectorised."""
    n = len(user)
    order = np.argsort(user, kind="stable")  # rows by (user, time)
    u_s, c_s = user[order], click[order].astype(bool)
    clicked_before = np.cumsum(c_s) - c_s  # clicks before this row, over all users so far
    first = np.searchsorted(u_s, u_s, side="left")
    start_of_user = clicked_before[first]  # flat index of the user's first click
    end = clicked_before  # this row's clicks-before, as a flat index into the clicked items
    start = np.maximum(start_of_user, end - history)
    flat = item[order][c_s]
    lengths_s = end - start
    lengths = np.empty(n, dtype=np.int64)
    lengths[order] = lengths_s
    starts = np.empty(n, dtype=np.int64)
    starts[order] = start
    pos = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
    return list_array(lengths, flat[pos].astype(np.int64))


def write_log(table: pa.Table, out: Path, test_fraction: float, files: int, row_group_size: int) -> dict:
    """Split a time-ordered table (first rows -> train, last round(N x test_fraction) -> test) and write
    OUT/train/part-NNNNN.parquet (`files` contiguous files) and OUT/test/part-NNNNN.parquet
    (ceil(files x test_fraction) files). Returns {"train_rows", "test_rows"}."""
    if not 0.0 < test_fraction < 1.0 or files < 1 or row_group_size < 1:
        raise ValueError("need 0 < test_fraction < 1, files >= 1, row_group_size >= 1")
    n_test = int(round(table.num_rows * test_fraction))
    n_train = table.num_rows - n_test
    for split, part, k in (
        ("train", table.slice(0, n_train), files),
        ("test", table.slice(n_train), max(1, math.ceil(files * test_fraction))),
    ):
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("part-*.parquet"):
            old.unlink()
        for f in range(k):
            lo, hi = part.num_rows * f // k, part.num_rows * (f + 1) // k
            pq.write_table(
                part.slice(lo, hi - lo),
                d / f"part-{f:05d}.parquet",
                row_group_size=row_group_size,
                compression="zstd",
                write_page_checksum=True,
            )
    return {"train_rows": n_train, "test_rows": n_test}


def report(out: Path) -> dict:
    """Click rate, oracle AUC (where oracle_p_click exists), the popularity prior (item click count in
    train, scored on test) and the share of test rows whose user / item never occurs in train."""
    res: dict = {}
    cols = ["user_id", "item_id", "click"]
    tables = {}
    for split in ("train", "test"):
        names = pq.read_schema(next((out / split).glob("part-*.parquet"))).names
        tables[split] = pq.read_table(out / split, columns=cols + [c for c in ["oracle_p_click"] if c in names])
    tr, te = tables["train"], tables["test"]
    for split, t in tables.items():
        y = t.column("click").to_numpy()
        res[f"{split}_rows"], res[f"{split}_click_rate"] = t.num_rows, float(y.mean())
        if "oracle_p_click" in t.column_names:
            res[f"{split}_oracle_auc"] = auc(t.column("oracle_p_click").to_numpy().astype(np.float64), y)
    tr_item, tr_click = tr.column("item_id").to_numpy(), tr.column("click").to_numpy()
    items, clicks = np.unique(tr_item[tr_click == 1], return_counts=True)
    te_item = te.column("item_id").to_numpy()
    prior = np.zeros(len(te_item))
    if len(items):
        at = np.minimum(np.searchsorted(items, te_item), len(items) - 1)
        hit = items[at] == te_item
        prior[hit] = clicks[at[hit]]
    res["test_popularity_auc"] = auc(prior, te.column("click").to_numpy())
    res["test_unseen_user_share"] = float(np.mean(~np.isin(te.column("user_id").to_numpy(), tr.column("user_id"))))
    res["test_unseen_item_share"] = float(np.mean(~np.isin(te_item, tr_item)))
    return res


def format_report(res: dict) -> str:
    """One `key=value` line per figure of `report`."""
    return "\n".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items())


def main(argv: list[str] | None = None) -> dict:
    """The CLI; returns {"train_rows", "test_rows", "seconds"} (and the report with --report)."""
    p = argparse.ArgumentParser(prog="python -m pipeline.tools.clicklog", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (train/ and test/ are created)")
    p.add_argument("--rows", type=int, required=True, help="rows in total (train + test)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the traffic and the labels")
    p.add_argument("--files", type=int, default=4, help="train files (test gets ceil(files x fraction))")
    p.add_argument("--test-fraction", type=float, default=0.2, help="the latest share of rows sent to test/")
    p.add_argument("--history", type=int, default=20, help="max length of hist_items (the oracle's window too)")
    p.add_argument("--row-group-size", type=int, default=8192, help="rows per Parquet row group")
    p.add_argument("--report", action="store_true", help="print click rate, AUCs and cold-start shares afterwards")
    a = p.parse_args(argv)
    t0 = time.time()
    return write_and_report(generate_log(a.rows, a.seed, a.history), a, t0)


def write_and_report(table: pa.Table, a: argparse.Namespace, t0: float) -> dict:
    """The tools' common tail: write the split log to a.out (`write_log`), say so, and --report."""
    out = Path(a.out)
    res = write_log(table, out, a.test_fraction, a.files, a.row_group_size)
    res["seconds"] = time.time() - t0
    print(f"wrote {res['train_rows']} train + {res['test_rows']} test rows to {out} in {res['seconds']:.1f} s")
    if a.report:
        res["report"] = report(out)
        print(format_report(res["report"]))
    return res


if __name__ == "__main__":
    main()
