"""One decoded row group -> `Piece`: its columns as the numpy arrays the compiled pass reads.

Legend: n rows in the piece, F dense features, K labels (tasks), S sparse features (KJT keys), A repair counters.

Each row group is converted once, in the reader's read-ahead thread, right after Arrow decodes it;
windows (`pipeline.convert.to_window`) then point into pieces by address. Columns stay where Arrow
decoded them whenever they can (zero-copy: no nulls, int64 ids, float32 dense values); everything
else is repaired into new arrays here and counted per row (so every batch knows exactly what it
carried): null dense/id/user values -> 0 or an empty bag (`nulls_repaired`), ids hashed into range by
'modulo' mapping (`ids_out_of_range`), ids of 'vocab' features mapped through their table's vocabulary
(`pipeline.vocab`), strings hashed to int64, lists truncated to their last max_len ids, `a[s]` features
looked up in the item catalogue their vocabulary carries (`pipeline.catalog`). Missing dense
values (null, NaN, inf) stay NaN and are counted on their way into a block (`native.fill_rows`,
`dense_missing`); the model's dense input fills them (`model.dense_input`). Ids of 'hash' features stay
raw: the compiled pass hashes them as it lays them out. Labels are validated by the reader (file and row
group known), never repaired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DataConfig, FeaturesConfig, SparseFeature
from pipeline.derived import length_source, length_values, lookup_source
from pipeline.ids import hash_strings, map_ids_into


class IdVocab(Protocol):
    """What decoding needs of a vocabulary (`pipeline.vocab.IdVocab`): raw int64 ids -> table rows, and the
    item catalogues of the `a[s]` features reading the table (`pipeline.catalog.ItemCatalog`, by name)."""

    catalogs: dict

    def map(self, raw_N: np.ndarray) -> np.ndarray: ...


HEALTH = ("dense_missing", "nulls_repaired", "ids_out_of_range")
"""Per-row repair counters, in this column order."""
NONFINITE, _NULLS, _OOR = range(3)


@dataclass
class Piece:
    """n decoded, repaired rows of one row group (its planned row range).

    Sparse feature s has its int64 ids in `ids[s]`: one per row when `offsets[s]` is None, else row r's
    ids are ids[s][offsets[s][r] : offsets[s][r + 1]] (offsets need not start at 0). The `*_addr`
    arrays hold the address of each column's first row (uint64; 0 for a missing user or row-id column
    and for absent offsets), for windows to point into.
    """

    n: int
    dense: list[np.ndarray]  # F float32
    labels: list[np.ndarray]  # K float32
    user: np.ndarray | None  # int64, None without a user-id column
    row: np.ndarray | None  # int64, None without a row-id column
    ids: list[np.ndarray]  # S int64
    offsets: list[np.ndarray | None]  # S int64 n + 1, or None
    health_NA: np.ndarray | None  # int64 n x len(HEALTH) repairs, None when nothing was repaired
    dense_addr: np.ndarray  # uint64 F
    labels_addr: np.ndarray  # uint64 K
    user_addr: int
    row_addr: int
    ids_addr: np.ndarray  # uint64 S
    offsets_addr: np.ndarray  # uint64 S, 0 where offsets is None

    def with_offsets(self, s: int) -> int:
        """Address of feature s's offsets, made (0, 1, ..., n) for a one-id-per-row feature that a
        window needs as a bag (another of its pieces has nulls in it)."""
        if self.offsets[s] is None:
            self.offsets[s] = np.arange(self.n + 1, dtype=np.int64)
            self.offsets_addr[s] = self.offsets[s].ctypes.data
        return int(self.offsets_addr[s])


def _np(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


class _Health:
    """Per-row repair counters of a piece, allocated on the first repair."""

    def __init__(self, n: int):
        self.n, self.nc = n, None

    def add(self, c: int, a: int, counts: np.ndarray) -> None:
        if self.nc is None:
            self.nc = np.zeros((self.n, len(HEALTH)), dtype=np.int64)
        self.nc[a : a + len(counts), c] += counts


def _flat_ids(arr: pa.Array, sf: SparseFeature) -> tuple[np.ndarray, np.ndarray | None]:
    """(raw ids int64, valid mask or None when no nulls) of a flat id array (strings hashed first)."""
    if sf.dtype == "string":
        ids, valid = hash_strings(arr)
        return ids, (valid if arr.null_count else None)
    if arr.null_count:
        return _np(arr.fill_null(0)).astype(np.int64, copy=False), np.asarray(arr.is_valid())
    return _np(arr).astype(np.int64, copy=False), None


def _map_into(
    ids: np.ndarray,
    sf: SparseFeature,
    out: np.ndarray,
    health: _Health,
    a: int,
    lens: np.ndarray | None = None,
    vocab: IdVocab | None = None,
) -> None:
    """Map the raw ids of rows [a, ...) into `out` (`lens`: ids per row, None for one id per row); ids
    hashed into range are counted on their rows. 'hash' ids are copied: the compiled pass hashes them.
    'vocab' ids go through the table's vocabulary (rare and unseen ids to its OOV rows)."""
    if sf.id_mapping == "hash":
        out[...] = ids
        return
    if sf.id_mapping == "vocab":
        if vocab is None:
            raise ValueError(f"feature '{sf.name}': id_mapping = 'vocab' but no vocabulary was given to the reader")
        out[...] = vocab.map(ids)
        return
    oor = map_ids_into(ids, sf.vocab_size, sf.id_mapping, out)
    if oor is not None:
        rows = np.arange(len(ids)) if lens is None else np.repeat(np.arange(len(lens)), lens)
        health.add(_OOR, a, np.bincount(rows[oor], minlength=len(ids) if lens is None else len(lens)))


def _list_chunk(arr: pa.Array, sf: SparseFeature, a: int, health: _Health) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int64, raw ids int64) of one list array of rows [a, a + len), null lists and
    null ids dropped (and counted), each list truncated to its last max_len ids."""
    n = len(arr)
    if arr.null_count:
        health.add(_NULLS, a, (~np.asarray(arr.is_valid())).astype(np.int64))
        lengths = _np(pc.list_value_length(arr).fill_null(0)).astype(np.int64)
        ids, valid = _flat_ids(arr.flatten(), sf)
    else:
        offs = _np(arr.offsets)
        lengths = np.diff(offs).astype(np.int64)
        ids, valid = _flat_ids(arr.values.slice(int(offs[0]), int(offs[-1] - offs[0])), sf)
    if valid is not None:  # null ids inside lists are dropped and counted
        dropped = np.bincount(np.repeat(np.arange(n), lengths)[~valid], minlength=n)
        health.add(_NULLS, a, dropped)
        lengths = lengths - dropped
        ids = ids[valid]
    if n and lengths.max() > sf.max_len:  # keep the last max_len ids of each row
        keep = np.minimum(lengths, sf.max_len)
        shift = np.cumsum(lengths) - np.cumsum(keep)  # first kept id of a row minus its new offset
        ids = ids[np.repeat(shift, keep) + np.arange(int(keep.sum()))]
        lengths = keep
    return lengths, ids


def _one(col: pa.ChunkedArray) -> pa.Array:
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def raw_bags(col: pa.ChunkedArray | pa.Array, sf: SparseFeature) -> tuple[np.ndarray, np.ndarray]:
    """(ids per row n, raw ids N) of feature `sf` in a column, as the reader sees them before mapping: a
    scalar row has 1 id or 0 (null), a list row its last max_len non-null ids (strings hashed)."""
    arr = _one(col) if isinstance(col, pa.ChunkedArray) else col
    if sf.max_len > 1:
        return _list_chunk(arr, sf, 0, _Health(len(arr)))
    ids, valid = _flat_ids(arr, sf)
    if valid is None:
        return np.ones(len(arr), dtype=np.int64), ids
    return valid.astype(np.int64), ids[valid]


def _sparse(
    arr: pa.Array, sf: SparseFeature, health: _Health, vocab: IdVocab | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids int64, offsets int64 or None) of one feature: views of Arrow's buffers when there is nothing
    to repair or map (no nulls, int64 ids, 'hash' or 'raw'), else null lists and null ids dropped (and
    counted), lists truncated to their last max_len ids and 'modulo' ids mapped (and counted) into new
    arrays. Scalar features get offsets only when they have nulls (bags of 0 or 1 id)."""
    n = len(arr)
    if sf.dtype != "string" and sf.id_mapping in ("hash", "raw") and not arr.null_count:
        if sf.max_len == 1:
            return np.ascontiguousarray(_np(arr), dtype=np.int64), None
        values = arr.values
        if not values.null_count and pa.types.is_int64(values.type):
            return _np(values), _np(arr.offsets).astype(np.int64)  # offsets index the unsliced values
    if sf.max_len == 1:
        raw, valid = _flat_ids(arr, sf)
        if valid is not None:
            health.add(_NULLS, 0, (~valid).astype(np.int64))
            raw = raw[valid]
        lens = None if valid is None else valid.astype(np.int64)
    else:
        lens, raw = _list_chunk(arr, sf, 0, health)
    ids = np.empty(len(raw), dtype=np.int64)
    _map_into(raw, sf, ids, health, 0, lens, vocab)
    if lens is None:
        return ids, None
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return ids, offsets


def _looked_up(
    seq: pa.Array, seq_sf: SparseFeature, sf: SparseFeature, vocab: IdVocab | None
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, offsets) of an `a[s]` feature: the catalogue's attribute ids of every item of sequence column
    `seq` (as feature `seq_sf` reads it: its last max_len ids), truncated to sf.max_len, as rows of the
    attribute's table (the catalogue maps its ids once: `ItemCatalog.table_rows`). The sequence's own
    nulls are counted by its own feature, not again here."""
    catalog = vocab.catalogs.get(sf.name) if vocab is not None else None
    if catalog is None:
        raise ValueError(f"feature '{sf.name}': no item catalogue was given to the reader (pipeline.catalog)")
    seq_lengths, items = _list_chunk(seq, seq_sf, 0, _Health(len(seq)))
    lengths, ids = catalog.lookup(seq_lengths, items, sf.max_len, catalog.table_rows(vocab))
    offsets = np.zeros(len(seq) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return ids, offsets


def _dense_column(arr: pa.Array) -> np.ndarray:
    """A dense feature column as contiguous float32 (zero-copy when it already is), nulls -> NaN: a missing
    value, counted with NaN / inf on its way into a block and filled by the model's dense input."""
    if arr.null_count:
        missing = ~np.asarray(arr.is_valid())
        out = np.array(_np(arr.fill_null(0)), dtype=np.float32)
        out[missing] = np.nan
        return out
    return np.ascontiguousarray(_np(arr), dtype=np.float32)


def _column(arr: pa.Array, dtype: type, health: _Health) -> np.ndarray:
    """A flat column as contiguous `dtype` values, nulls -> 0 (counted)."""
    if arr.null_count:
        health.add(_NULLS, 0, (~np.asarray(arr.is_valid())).astype(np.int64))
        arr = arr.fill_null(0)
    return np.ascontiguousarray(_np(arr), dtype=dtype)


def _addr(arrays: list[np.ndarray | None]) -> np.ndarray:
    return np.array([0 if a is None else a.ctypes.data for a in arrays], dtype=np.uint64)


def decode_piece(
    table: pa.Table, data: DataConfig, features: FeaturesConfig, vocabs: dict[str, IdVocab] | None = None
) -> Piece:
    """Convert one label-validated row group (or row range of one) into a Piece (`vocabs`: the id
    vocabularies by table, needed when a feature has id_mapping = 'vocab')."""
    n = table.num_rows
    cols = {name: _one(col) for name, col in zip(table.column_names, table.columns)}
    health = _Health(n)
    dense = [
        length_values(cols[src]) if (src := length_source(name)) else _dense_column(cols[name])
        for name in features.dense
    ]
    labels = [_column(cols[name], np.float32, health) for name in features.labels]
    user = _column(cols[features.user_id], np.int64, health) if features.user_id else None
    row = _column(cols[data.row_id_column], np.int64, health) if data.row_id_column else None
    ids, offsets = [], []
    by_name = {sf.name: sf for sf in features.sparse}
    for sf in features.sparse:
        vocab = (vocabs or {}).get(sf.table_name)
        if (lookup := lookup_source(sf.name)) is not None:
            f_ids, f_offsets = _looked_up(cols[lookup[1]], by_name[lookup[1]], sf, vocab)
        else:
            f_ids, f_offsets = _sparse(cols[sf.name], sf, health, vocab)
        ids.append(f_ids)
        offsets.append(f_offsets)
    return Piece(
        n, dense, labels, user, row, ids, offsets, health.nc, _addr(dense), _addr(labels), int(_addr([user])[0]),
        int(_addr([row])[0]), _addr(ids), _addr(offsets),
    )  # fmt: skip
