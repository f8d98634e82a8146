"""The item catalogue: what the training rows say about each item, for the items of a behaviour sequence.

    [features]
    item_id = "item_id"
    sparse = [
      { name = "item_id", table = "item", ... },
      { name = "item_genres", table = "genre", max_len = 6, ... },
      { name = "hist_items", table = "item", max_len = 20, ... },
      { name = "item_genres[hist_items]", table = "genre", max_len = 60, ... },   # the history's genres
    ]

A behaviour sequence holds bare item ids, but the candidate item comes with its attributes (genres,
category, brand, ...) on every row. `a[s]` gives the sequence those attributes too: for each id of `s`
(the sequence as the model sees it: its last max_len ids), the ids that column `a` held on the first
training row whose candidate (`features.item_id`) was that item, concatenated in sequence order and
truncated to the feature's last max_len ids. An item the training rows never had as a candidate adds
nothing (a history of only such items gives an empty bag). It is DIN's category sequence, derived from
the log itself: no side table to ship or keep in sync.

The catalogue is built in the statistics pass that counts the vocabularies (`pipeline.vocab`), over the
training rows *and* the validation carve (an attribute is no label; the vocabulary counts stop before
the carve): each rank keeps the first row of every item in its share of the row groups, keyed by
(row-group unit, row); the merge keeps the earliest key per item, so 1 and 2 ranks give the same
catalogue. Memory is bounded: at most `features.vocab_exact_ids` items, the earliest-seen ones, the same
set for any world size (each rank's earliest `limit` contain the global earliest `limit`). On a
time-ordered log the cap drops the newest items, whose attributes the next period's histories need
most: the run log marks a capped catalogue, and `features.vocab_exact_ids` raises it. It is saved with
the vocabularies (`vocab.npz`: run directory, every checkpoint, the export artifact), so evaluate,
export and predict look attributes up exactly as training did.

Legend: n rows, N ids (flattened bags).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

_ROW_BITS = 32  # key = unit << 32 | row: a row group has fewer than 2^32 rows


class _Mapping(Protocol):
    """A vocabulary (`pipeline.vocab.IdVocab`): raw int64 ids -> table rows."""

    def map(self, raw_N: np.ndarray) -> np.ndarray: ...


def gather_segments(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """values[starts[0] : starts[0] + lengths[0]], values[starts[1] : ...], ... concatenated (int64)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.cumsum(lengths) - lengths  # output position of each segment's first value
    return values[np.repeat(np.asarray(starts, dtype=np.int64) - first, lengths) + np.arange(total)]


@dataclass
class ItemCatalog:
    """item id -> attribute ids, for one `a[s]` feature.

    Args:
        ids: the catalogued item ids, sorted ascending (int64, raw: strings already hashed).
        offsets: len(ids) + 1 int64; item ids[c] has the attribute ids values[offsets[c] : offsets[c + 1]].
        values: the raw attribute ids (int64), before any table mapping.
        capped: more items were seen than the limit kept (the newest ones have no entry).
    """

    ids: np.ndarray
    offsets: np.ndarray
    values: np.ndarray
    capped: bool = False
    _rows: tuple[_Mapping, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.ids)

    def lookup(
        self, lengths_n: np.ndarray, items_N: np.ndarray, max_len: int | None = None, values: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The attributes of bags of items.

        Args:
            lengths_n: n items per row; items_N: the N = sum(lengths_n) item ids, row after row.
            max_len: keep each row's last max_len attribute ids (None: all); the dropped ones are never
                gathered.
            values: what to gather in place of `self.values`, aligned with it (e.g. `table_rows`).

        Returns:
            (lengths_n of the attribute bags, their ids): row r's bag is the attribute ids of its items in
            order, an item missing from the catalogue contributing none, cut to its last max_len.
        """
        n = len(lengths_n)
        items_N = np.asarray(items_N, dtype=np.int64)
        if self.size == 0 or items_N.size == 0:
            return np.zeros(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, items_N), self.size - 1)
        hit = self.ids[pos] == items_N
        count_N = np.where(hit, self.offsets[pos + 1] - self.offsets[pos], 0)
        rows = np.repeat(np.arange(n), np.asarray(lengths_n, dtype=np.int64))
        out_lengths = np.bincount(rows, weights=count_N, minlength=n).astype(np.int64)
        start_N = self.offsets[pos]
        if max_len is not None and out_lengths.max() > max_len:
            # attribute ids after item j's in its row = row total - (ids up to and including j's)
            through_N = np.cumsum(count_N) - (np.cumsum(out_lengths) - out_lengths)[rows]
            keep_N = np.clip(max_len - (out_lengths[rows] - through_N), 0, count_N)
            start_N = start_N + count_N - keep_N  # an item cut in two keeps its last ids
            count_N, out_lengths = keep_N, np.minimum(out_lengths, max_len)
        source = self.values if values is None else values
        return out_lengths, gather_segments(source, start_N[hit], count_N[hit])

    def table_rows(self, vocab: _Mapping) -> np.ndarray:
        """`values` mapped to table rows by `vocab` (the attribute table's vocabulary), computed on the first
        call for that vocabulary and kept: the reader gathers rows, not raw ids, so each attribute id is
        mapped once per catalogue, not once per occurrence in a batch."""
        cached = self._rows
        if cached is None or cached[0] is not vocab:
            cached = self._rows = (vocab, np.asarray(vocab.map(self.values), dtype=np.int64))
        return cached[1]


@dataclass
class CatalogPart:
    """One rank's first rows per item (picklable, for the gather): ids, keys (unit << 32 | row), and
    each item's attribute ids as lengths + flat values."""

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    capped: bool = False

    def first_per_item(self, limit: int) -> CatalogPart:
        """The earliest entry (smallest key) of each item, at most `limit` items (the earliest ones)."""
        order = np.argsort(self.keys, kind="stable")
        _, first = np.unique(self.ids[order], return_index=True)
        keep, capped = order[first], self.capped or len(first) > limit
        if capped:
            keep = keep[np.argsort(self.keys[keep], kind="stable")[:limit]]
        keep = keep[np.argsort(self.ids[keep], kind="stable")]
        offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        values = gather_segments(self.values, offsets[keep], self.lengths[keep])
        return CatalogPart(self.ids[keep], self.keys[keep], self.lengths[keep], values, capped)

    @staticmethod
    def concat(parts: list[CatalogPart]) -> CatalogPart:
        fields = ("ids", "keys", "lengths", "values")
        arrays = (np.concatenate([getattr(p, f) for p in parts]) for f in fields)
        return CatalogPart(*arrays, capped=any(p.capped for p in parts))


class CatalogBuilder:
    """Collects the first row of every item over row groups read in increasing unit order (one rank's
    share), in memory bounded by `limit` items (plus one compaction's worth of pending entries).

    Args:
        limit: the most items kept (`features.vocab_exact_ids`).
        compact_every: pending entries that trigger a compaction at the least (tests make it small).
    """

    def __init__(self, limit: int, compact_every: int = 1 << 16) -> None:
        self.limit, self.compact_every = limit, compact_every
        self.done = CatalogPart()
        self._pending: list[CatalogPart] = []
        self._pending_n = 0

    def add(
        self,
        unit: int,
        items_n: np.ndarray,
        valid_n: np.ndarray | None,
        lengths_n: np.ndarray,
        values: np.ndarray,
    ) -> None:
        """One row group: its candidate items (`valid_n`: False where the item is null, None = all valid) and
        each row's attribute ids (lengths_n per row, values flat)."""
        rows = np.arange(len(items_n)) if valid_n is None else np.flatnonzero(valid_n)
        if rows.size == 0:
            return
        _, first = np.unique(items_n[rows], return_index=True)  # each item's first row in this group
        rows = rows[first]
        offsets = np.concatenate([[0], np.cumsum(lengths_n)])
        part = CatalogPart(
            np.asarray(items_n[rows], dtype=np.int64),
            (np.int64(unit) << _ROW_BITS) + rows.astype(np.int64),
            np.asarray(lengths_n[rows], dtype=np.int64),
            gather_segments(np.asarray(values, dtype=np.int64), offsets[rows], lengths_n[rows]),
        )
        self._pending.append(part)
        self._pending_n += len(rows)
        if self._pending_n >= max(len(self.done.ids), self.limit, self.compact_every):
            self._compact()

    def _compact(self) -> None:
        if self._pending:
            self.done = CatalogPart.concat([self.done, *self._pending]).first_per_item(self.limit)
            self._pending, self._pending_n = [], 0

    def finish(self) -> CatalogPart:
        """This rank's part (earliest row per item, at most `limit` items)."""
        self._compact()
        return self.done

    @staticmethod
    def merge(parts: list[CatalogPart], limit: int) -> ItemCatalog:
        """The catalogue from every rank's part: the earliest row per item over all ranks."""
        p = CatalogPart.concat(parts).first_per_item(limit)
        return ItemCatalog(p.ids, np.concatenate([[0], np.cumsum(p.lengths)]).astype(np.int64), p.values, p.capped)
