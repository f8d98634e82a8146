"""Id vocabularies counted on the training rows: frequent ids get their own table row, rare and unseen
ids share out-of-vocabulary (OOV) rows.

    counts, catalogs = scan_training_rows(plan, features, rank=r, world_size=w, gather=all_gather_object)
    vocabs = build_vocabs(features, counts, catalogs)  # {table: IdVocab}; vocab_size = "auto" resolved from them
    rows = vocabs["item"].map(raw_ids_N)          # int64 rows in [0, vocabs["item"].size)
    save_vocabs(path, vocabs) / load_vocabs(path) # <run>/vocab.npz, copied into every checkpoint and artifact

Row layout of a table with `oov_buckets` = O and V kept ids (sorted ascending): rows [0, O) are the OOV
rows (an OOV id goes to row mix64(id) mod O, so O = 1 sends every rare or new id to row 0), rows
[O, O + V) are the kept ids in ascending id order. An id is kept when it occurs at least `min_count`
times in the training rows (over every feature reading the table: a candidate item and an item history
count into one vocabulary); a numeric `vocab_size` caps the table, keeping the most frequent
`vocab_size - O` ids (ties: smaller id first).

Counting is bounded in memory. Each rank counts its share of the row groups (units r, r + w, ...)
exactly while a table has at most `features.vocab_exact_ids` distinct ids; beyond that it switches to a
count-min sketch (SKETCH_DEPTH x `features.vocab_sketch_width` int64 counters, additive, so merges are
exact) plus the `vocab_exact_ids` heavy hitters by sketched count. Partial results are merged in rank
order; while the merged table stays within the exact limit the vocabulary is exact and the same for
any world size (tested 1 == 2 ranks). In sketch mode counts are over-estimates (by at most
e / width x total occurrences with probability 1 - exp(-depth)), so an id may be kept with fewer
than `min_count` true occurrences, never dropped while it has more (unless it falls outside the
heavy-hitter set).

The same pass builds the item catalogues of `a[s]` features (`pipeline.catalog`), kept in the vocabulary
file and on the IdVocab of the attribute's table (`IdVocab.catalogs`).

Legend: N ids (of a row group, or to map), V kept ids of a table.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.catalog import CatalogBuilder, ItemCatalog
from pipeline.config import FeaturesConfig, SparseFeature
from pipeline.decode import raw_bags
from pipeline.dense_stats import read_columns
from pipeline.derived import lookup_source
from pipeline.errors import DataError
from pipeline.ids import _mod, mix64, sum_by_id
from pipeline.plan import DatasetPlan

VOCAB_FILE = "vocab.npz"
"""File name of the vocabularies in a run directory, a checkpoint and an inference artifact."""
VOCAB_FORMAT = 1
SKETCH_DEPTH = 4
_SKETCH_SEEDS = np.array([0x243F6A8885A308D3, 0x13198A2E03707344, 0x0A4093822299F31D, 0x082EFA98EC4E6C89], np.uint64)

Gather = Callable[[object], list[object]]
"""Collects one picklable object from every rank, in rank order (all_gather_object)."""


@dataclass
class IdCounts:
    """Occurrence counts of one table's ids: exact (`ids`, `counts`) or a count-min sketch plus heavy hitters.

    Args:
        limit: distinct ids counted exactly before switching to the sketch.
        width: counters per sketch row.
    """

    limit: int
    width: int
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Sorted distinct ids (exact mode) or heavy-hitter candidates (sketch mode)."""
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Their counts: exact, or the sketch's estimates."""
    sketch: np.ndarray | None = None
    """SKETCH_DEPTH x width int64 counters; None while exact."""
    total: int = 0
    """Id occurrences counted."""
    _pending: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)
    _pending_n: int = 0

    @property
    def exact(self) -> bool:
        return self.sketch is None

    def add(self, ids_N: np.ndarray) -> None:
        """Count the ids of one row group (any int64 values)."""
        if ids_N.size == 0:
            return
        u, c = sum_by_id(np.asarray(ids_N, dtype=np.int64))
        self.total += int(ids_N.size)
        self._pending.append((u, c))
        self._pending_n += len(u)
        if self._pending_n >= max(len(self.ids), 1 << 16):  # amortised: merge when pending outgrows the table
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        parts = [(self.ids, self.counts), *self._pending] if self.exact else self._pending
        self._pending, self._pending_n = [], 0
        u, c = sum_by_id(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        if self.exact:
            self.ids, self.counts = u, c
            if len(u) > self.limit:
                self._to_sketch()
        else:
            self._sketch_add(u, c)
            self._keep_heavy(np.concatenate([self.ids, u]))

    def _rows(self, ids_N: np.ndarray) -> np.ndarray:
        """SKETCH_DEPTH x N column of each id in each sketch row."""
        keyed = ids_N.view(np.uint64)[None, :] ^ _SKETCH_SEEDS[:, None]
        return _mod(mix64(keyed), self.width)

    def _sketch_add(self, ids_N: np.ndarray, counts_N: np.ndarray) -> None:
        assert self.sketch is not None
        cols = self._rows(ids_N)
        for d in range(SKETCH_DEPTH):
            np.add.at(self.sketch[d], cols[d], counts_N)

    def estimate(self, ids_N: np.ndarray) -> np.ndarray:
        """Counts of ids_N: the sketch's minimum over its rows (never below the true count)."""
        assert self.sketch is not None
        cols = self._rows(np.asarray(ids_N, dtype=np.int64))
        return np.min(np.stack([self.sketch[d][cols[d]] for d in range(SKETCH_DEPTH)]), axis=0)

    def _to_sketch(self) -> None:
        self.sketch = np.zeros((SKETCH_DEPTH, self.width), dtype=np.int64)
        self._sketch_add(self.ids, self.counts)
        self._keep_heavy(self.ids)

    def _keep_heavy(self, candidates: np.ndarray) -> None:
        """Keep the `limit` candidates with the largest sketched counts (ties: smaller id)."""
        u = np.unique(candidates)
        est = self.estimate(u)
        if len(u) > self.limit:
            order = np.lexsort((u, -est))[: self.limit]
            order.sort()
            u, est = u[order], est[order]
        self.ids, self.counts = u, est

    def finish(self) -> IdCounts:
        """Merge what is pending; returns self (picklable, for the gather)."""
        self._flush()
        return self

    @staticmethod
    def merge(parts: list[IdCounts]) -> IdCounts:
        """One table's counts from every rank's (same limit and width); exact while the union fits."""
        first = parts[0]
        out = IdCounts(first.limit, first.width, total=sum(p.total for p in parts))
        if all(p.exact for p in parts):
            u, c = sum_by_id(np.concatenate([p.ids for p in parts]), np.concatenate([p.counts for p in parts]))
            out.ids, out.counts = u, c
            if len(u) <= out.limit:
                return out
            out._to_sketch()
            return out
        out.sketch = np.zeros((SKETCH_DEPTH, out.width), dtype=np.int64)
        for p in parts:
            if p.exact:
                out._sketch_add(p.ids, p.counts)
            else:
                out.sketch += p.sketch  # type: ignore[operator]
        out._keep_heavy(np.concatenate([p.ids for p in parts]))
        return out


def vocab_tables(features: FeaturesConfig) -> dict[str, list[SparseFeature]]:
    """{table: its features} for every table whose features use id_mapping = 'vocab' (config order)."""
    out: dict[str, list[SparseFeature]] = {}
    for sf in features.sparse:
        if sf.id_mapping == "vocab":
            out.setdefault(sf.table_name, []).append(sf)
    return out


def lookup_features(features: FeaturesConfig) -> list[SparseFeature]:
    """The `a[s]` features (item attributes of a sequence), in config order."""
    return [sf for sf in features.sparse if lookup_source(sf.name) is not None]


def scan_training_rows(
    plan: DatasetPlan,
    features: FeaturesConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
    carve: DatasetPlan | None = None,
) -> tuple[dict[str, IdCounts], dict[str, ItemCatalog]]:
    """One pass over the rows of `plan` (collective when world_size > 1): the id counts of every vocabulary
    table and the item catalogue of every `a[s]` feature, by feature name (`pipeline.catalog`: the earliest
    row of each candidate item, at most features.vocab_exact_ids items). The catalogue also reads the rows
    of `carve` (the validation carve, after `plan`'s rows in the same files): item attributes are no label,
    and the latest items are the ones the next period's histories hold; the counts never do.

    Ids are counted as the pipeline delivers them before mapping: strings hashed to int64, null ids
    dropped, lists truncated to their last max_len ids. An `a[s]` feature counts nothing of its own: its
    ids are those of attribute `a`, counted there.

    Raises:
        DataError: a row group cannot be read (names the file).
    """
    if world_size > 1 and gather is None:
        raise ValueError("scan_training_rows: world_size > 1 needs a gather function (all_gather_object)")
    gather = gather or (lambda obj: [obj])
    tables = {t: [sf for sf in fs if lookup_source(sf.name) is None] for t, fs in vocab_tables(features).items()}
    lookups = lookup_features(features)
    if not tables:
        return {}, {}
    by_name = {sf.name: sf for sf in features.sparse}
    attrs = list(dict.fromkeys(lookup_source(sf.name)[0] for sf in lookups))  # type: ignore[index]
    names = [sf.name for fs in tables.values() for sf in fs]
    names += [n for n in [features.item_id, *attrs] if lookups and n not in names]
    local = {t: IdCounts(features.vocab_exact_ids, features.vocab_sketch_width) for t in tables}
    builders = {a: CatalogBuilder(features.vocab_exact_ids) for a in attrs}
    counted, rows = len(plan.units), plan
    if lookups and carve is not None and carve.units:  # the carve: after the plan's rows, in the same files
        assert carve.files == plan.files, "scan_training_rows: the carve must come from the plan's files"
        rows = dataclasses.replace(plan, units=[*plan.units, *carve.units])
    units = list(range(rank, len(rows.units), world_size))
    if [rows.units[u].file_index for u in units] != sorted(rows.units[u].file_index for u in units):  # by file
        raise ValueError("scan_training_rows: the units must be in file order, as read_columns yields them")
    for unit, table in zip(units, read_columns(rows, names, units)):
        if unit < counted:
            for t, fs in tables.items():
                for sf in fs:
                    local[t].add(raw_bags(table.column(sf.name), sf)[1])
        if builders:
            has_item, item_ids = raw_bags(table.column(features.item_id), by_name[features.item_id])
            items = np.zeros(table.num_rows, dtype=np.int64)
            items[has_item == 1] = item_ids
            for a, builder in builders.items():
                builder.add(unit, items, has_item == 1, *raw_bags(table.column(a), by_name[a]))
    parts = gather(({t: c.finish() for t, c in local.items()}, {a: b.finish() for a, b in builders.items()}))
    counts = {t: IdCounts.merge([p[0][t] for p in parts]) for t in tables}  # type: ignore[index]
    merged = {a: CatalogBuilder.merge([p[1][a] for p in parts], features.vocab_exact_ids) for a in attrs}  # type: ignore[index]
    return counts, {sf.name: merged[lookup_source(sf.name)[0]] for sf in lookups}  # type: ignore[index]


@dataclass
class IdVocab:
    """The id -> row mapping of one table (see the module docstring for the row layout).

    Args:
        table: table name.
        ids: V kept raw ids, sorted ascending (int64).
        counts: their training-row counts (exact, or sketched when `exact` is False).
        oov_buckets: OOV rows at the start of the table.
        min_count: the threshold the ids were kept by.
        exact: whether the counts were exact.
        total: id occurrences in the training rows; oov_total: those that map to an OOV row.
        distinct: distinct ids seen (exact mode), or the heavy hitters tracked (sketch mode).
        catalogs: the item catalogues of the `a[s]` features whose table this is, by feature name.
    """

    table: str
    ids: np.ndarray
    counts: np.ndarray
    oov_buckets: int
    min_count: int
    exact: bool = True
    total: int = 0
    oov_total: int = 0
    distinct: int = 0
    catalogs: dict[str, ItemCatalog] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Table rows: oov_buckets + kept ids."""
        return self.oov_buckets + len(self.ids)

    def map(self, raw_N: np.ndarray) -> np.ndarray:
        """Rows (int64, in [0, size)) of raw ids: kept id k -> oov_buckets + its rank, others -> OOV rows."""
        raw_N = np.ascontiguousarray(raw_N, dtype=np.int64).reshape(-1)
        if len(self.ids) == 0:
            return self._oov(raw_N)
        pos = np.searchsorted(self.ids, raw_N)
        np.minimum(pos, len(self.ids) - 1, out=pos)
        hit = self.ids[pos] == raw_N
        rows = pos + self.oov_buckets
        if not hit.all():
            miss = ~hit
            rows[miss] = self._oov(raw_N[miss])
        return rows

    def _oov(self, raw_N: np.ndarray) -> np.ndarray:
        if self.oov_buckets == 1:
            return np.zeros(len(raw_N), dtype=np.int64)
        return _mod(mix64(raw_N), self.oov_buckets)

    def summary(self) -> dict[str, float | int | bool]:
        """What the run log prints and summary.json keeps for this table."""
        return {
            "rows": self.size,
            "kept_ids": len(self.ids),
            "distinct_ids": self.distinct,
            "oov_buckets": self.oov_buckets,
            "min_count": self.min_count,
            "exact": self.exact,
            "train_oov_share": self.oov_total / self.total if self.total else 0.0,
        }


def _vocab_settings(fs: list[SparseFeature]) -> tuple[int | str, int, int]:
    """(vocab_size, min_count, oov_buckets) of a table; its features must agree (config errors name them)."""
    first = fs[0]
    for sf in fs[1:]:
        for name in ("vocab_size", "min_count", "oov_buckets"):
            if getattr(sf, name) != getattr(first, name):
                raise DataError(
                    f"features.sparse '{sf.name}': table '{sf.table_name}' is shared with '{first.name}' but "
                    f"{name} differs ({getattr(sf, name)!r} vs {getattr(first, name)!r})"
                )
    return first.vocab_size, first.min_count, first.oov_buckets


def build_vocabs(
    features: FeaturesConfig, counts: dict[str, IdCounts], catalogs: dict[str, ItemCatalog] | None = None
) -> dict[str, IdVocab]:
    """The vocabulary of every 'vocab' table from its counts (keeps ids with count >= min_count, capped
    by a numeric vocab_size), carrying the catalogues of its `a[s]` features (`scan_training_rows`)."""
    out: dict[str, IdVocab] = {}
    for t, fs in vocab_tables(features).items():
        size, min_count, oov = _vocab_settings(fs)
        c = counts[t]
        keep = c.counts >= min_count
        ids, cnt = c.ids[keep], c.counts[keep]
        if isinstance(size, int) and len(ids) > size - oov:  # cap: the most frequent ids, ties by smaller id
            top = np.lexsort((ids, -cnt))[: max(size - oov, 0)]
            top.sort()
            ids, cnt = ids[top], cnt[top]
        out[t] = IdVocab(t, ids, cnt, oov, min_count, c.exact, c.total, c.total - int(cnt.sum()), len(c.ids))
    for sf in lookup_features(features):
        if sf.name not in (catalogs or {}):
            raise ValueError(f"build_vocabs: feature '{sf.name}' needs its item catalogue (scan_training_rows)")
        out[sf.table_name].catalogs[sf.name] = catalogs[sf.name]  # type: ignore[index]
    return out


def resolve_sizes(features: FeaturesConfig, vocabs: dict[str, IdVocab]) -> None:
    """Set every 'vocab' feature's vocab_size to its table's rows ("auto" resolved; a cap may be larger
    than the ids kept, in which case the table keeps the configured size and the extra rows stay unused)."""
    for sf in features.sparse:
        if sf.id_mapping == "vocab":
            v = vocabs[sf.table_name]
            sf.vocab_size = v.size if sf.vocab_size == "auto" else max(int(sf.vocab_size), v.size)


def save_vocabs(path: Path, vocabs: dict[str, IdVocab], key: str = "") -> None:
    """Write the vocabularies to `path` (npz, no pickle), atomically (temp name + rename); `key`: the data
    key of a cache (`vocab_key`)."""
    arrays: dict[str, np.ndarray] = {"format": np.array([VOCAB_FORMAT], np.int64), "key": np.array([key])}
    for t, v in vocabs.items():
        arrays[f"{t}/ids"] = v.ids
        arrays[f"{t}/counts"] = v.counts
        arrays[f"{t}/meta"] = np.array([v.oov_buckets, v.min_count, int(v.exact), v.total, v.oov_total, v.distinct])
        for name, cat in v.catalogs.items():
            arrays[f"catalog/{name}/ids"], arrays[f"catalog/{name}/offsets"] = cat.ids, cat.offsets
            arrays[f"catalog/{name}/values"] = cat.values
            arrays[f"catalog/{name}/capped"] = np.array([int(cat.capped)])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def load_vocabs(path: Path, features: FeaturesConfig) -> dict[str, IdVocab]:
    """The vocabularies saved at `path` for `features` (every 'vocab' table must be there).

    Raises:
        DataError: the file is missing, unreadable, or lacks a table (one line naming the file / table).
    """
    tables = vocab_tables(features)
    if not tables:
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: cannot read the id vocabularies ({e}); features {sorted(tables)} need them") from None
    if int(data.get("format", [0])[0]) != VOCAB_FORMAT:
        raise DataError(f"{path}: not a vocabulary file of format {VOCAB_FORMAT}")
    out = {}
    for t in tables:
        if f"{t}/ids" not in data:
            raise DataError(
                f"{path}: no vocabulary for table '{t}' (has: {sorted(k[:-4] for k in data if k.endswith('/ids'))})"
            )
        oov, min_count, exact, total, oov_total, distinct = (int(x) for x in data[f"{t}/meta"])
        out[t] = IdVocab(
            t, data[f"{t}/ids"], data[f"{t}/counts"], oov, min_count, bool(exact), total, oov_total, distinct
        )
    for sf in lookup_features(features):
        k = f"catalog/{sf.name}"
        if f"{k}/ids" not in data:
            raise DataError(f"{path}: no item catalogue for feature '{sf.name}' (vocabularies built without it)")
        capped = bool(data.get(f"{k}/capped", [0])[0])
        cat = ItemCatalog(data[f"{k}/ids"], data[f"{k}/offsets"], data[f"{k}/values"], capped)
        if len(cat.offsets) != cat.size + 1 or (cat.size and int(cat.offsets[-1]) != len(cat.values)):
            raise DataError(f"{path}: the item catalogue of feature '{sf.name}' is inconsistent (offsets vs values)")
        out[sf.table_name].catalogs[sf.name] = cat
    return out


def check_sizes(features: FeaturesConfig, vocabs: dict[str, IdVocab], where: str) -> None:
    """Every 'vocab' feature's table is large enough for its vocabulary (a run's config against its file)."""
    for sf in features.sparse:
        if sf.id_mapping == "vocab":
            v = vocabs[sf.table_name]
            if not isinstance(sf.vocab_size, int) or sf.vocab_size < v.size:
                raise DataError(
                    f"{where}: feature '{sf.name}' has vocab_size {sf.vocab_size!r} but its vocabulary needs "
                    f"{v.size} rows"
                )


def vocab_key(plan: DatasetPlan, features: FeaturesConfig, carve: DatasetPlan | None = None) -> str:
    """A key of everything the vocabularies depend on: files (path, size, modification time), row ranges,
    the vocabulary features' columns and settings."""
    feats = [
        (sf.name, sf.table_name, sf.dtype, sf.max_len, str(sf.vocab_size), sf.min_count, sf.oov_buckets)
        for fs in vocab_tables(features).values()
        for sf in fs
    ]
    if lookup_features(features):  # the catalogue's key column and rows (kept out otherwise: old caches stay valid)
        feats.append(("item_id", features.item_id, carve.content_key() if carve is not None else ""))
    return plan.content_key(VOCAB_FORMAT, feats, features.vocab_exact_ids, features.vocab_sketch_width)


def load_or_count_vocabs(
    plan: DatasetPlan,
    features: FeaturesConfig,
    cache: Path | None,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
    broadcast: Callable[[object], object] | None = None,
    carve: DatasetPlan | None = None,
) -> tuple[dict[str, IdVocab], bool]:
    """The vocabularies of `features` over `plan` (collective), from `cache` when its key matches; on a miss
    every rank counts its share and rank 0 writes the cache (`carve`: rows the item catalogues read too,
    `scan_training_rows`). Returns (vocabs, whether the cache was reused)."""
    if not vocab_tables(features):
        return {}, False
    key = vocab_key(plan, features, carve)
    hit = None
    if rank == 0 and cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                same = "key" in z.files and str(z["key"][0]) == key
            hit = load_vocabs(cache, features) if same else None
        except (OSError, ValueError, DataError, zipfile.BadZipFile):
            hit = None  # an unreadable cache is recounted, never trusted
    if world_size > 1:
        assert broadcast is not None, "load_or_count_vocabs: world_size > 1 needs broadcast"
        hit = broadcast(hit)  # type: ignore[assignment]
    if hit is not None:
        return hit, True
    scanned = scan_training_rows(plan, features, rank=rank, world_size=world_size, gather=gather, carve=carve)
    vocabs = build_vocabs(features, *scanned)
    if rank == 0 and cache is not None:
        save_vocabs(cache, vocabs, key=key)
    return vocabs, False


def report(vocabs: dict[str, IdVocab]) -> str:
    """The table the run log prints: per vocabulary table, its rows and how much of the data is OOV."""
    lines = [f"{'id vocabulary':<18}{'rows':>10}{'kept':>10}{'distinct':>10}{'min_count':>10}{'train OOV':>11}  counts"]
    for t, v in vocabs.items():
        s = v.summary()
        lines.append(
            f"{t:<18}{s['rows']:>10}{s['kept_ids']:>10}{s['distinct_ids']:>10}{s['min_count']:>10}"
            f"{s['train_oov_share']:>11.2%}  {'exact' if v.exact else 'count-min sketch'}"
        )
        for name, cat in v.catalogs.items():
            cap = "  CAPPED at features.vocab_exact_ids: the newest items have none" * cat.capped
            lines.append(f"  item catalogue of {name}: {cat.size} items, {len(cat.values)} attribute ids{cap}")
    return "\n".join(lines)
