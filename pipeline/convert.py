"""Arrow row-group slices -> one shuffle window of hashed numpy columns -> blocks of ready batches.

Legend: N rows in a window, B batch size, J batches in a block, F dense features, K label columns
(tasks), S sparse features, R scalar sparse features, C health counters, V ids in a block.

Two steps (no per-row Python; per-batch Python only to hand out views):
1. `to_window`: the table slices of a window are decoded column chunk by column chunk, in file order.
   Sparse ids stay where Arrow decoded them whenever they can (one chunk, no nulls, nothing to
   truncate: zero-copy views), else they are repaired into one array per feature. Ids of 'hash'
   features are not hashed here; 'modulo' ids are mapped (and counted) here. Nothing is permuted.
2. `fill_block`: batches [j0, j1) of the window, rows in the window's shuffled order, go straight into
   one contiguous buffer (`alloc`: a plain or a shared-memory tensor), from which `block_batches`
   hands out zero-copy views. The sparse ids are gathered, hashed and laid out in KJT order by one
   call of the compiled pass (`pipeline.native`); dense values, labels and ids by numpy gathers.

Repairs happen in step 1 and are counted per row (so every batch knows exactly what it carried):
NaN/inf dense values -> 0 (`dense_nonfinite_repaired`), null dense/id/user values -> 0 or an empty bag
(`nulls_repaired`), ids hashed into range by 'modulo' mapping (`ids_out_of_range`). Labels are
validated where the file and row group are known (pipeline.reader), never repaired.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import native
from pipeline.config import DataConfig, FeaturesConfig, SparseFeature
from pipeline.ids import MEMO_IDS, hash_strings, map_ids_into, memo_for

HEALTH = ("dense_nonfinite_repaired", "nulls_repaired", "ids_out_of_range")
"""Per-row counters carried by every window, in this column order."""
_NONFINITE, _NULLS, _OOR = range(3)
STATS = (*HEALTH, "padded_rows", "rows")
"""Per-batch counters of a block, in this order; a block's stats rows carry one more entry after them:
the batch's audit checksum (sum of mix64(row id) mod 2**64, as int64 bits)."""

BatchArrays = tuple[np.ndarray, ...]
"""(values, lengths, dense_BF, labels_BK, weights_B, user_ids_B, row_ids_B, stats): views into a block,
see `block_batches`."""

Header = tuple[int, int, int, int, int, int]
"""(J, B, S, F, K, V): everything `block_sections` needs to find the arrays in a block buffer."""

Block = tuple[torch.Tensor, Header]
"""(buffer uint8, header): J batches in one buffer, see `fill_block` and `block_batches`."""


@dataclass
class Window:
    """N decoded, repaired rows of one shuffle window in file order; `order` is the (shuffled) order in
    which they go out.

    The window is P slices of decoded row groups (window rows [part_start[p], part_start[p + 1])),
    every column being an address per slice, usually of Arrow's own buffer. Dense feature f is a
    float32 column at `dense_FP[f, p]` (nulls already 0, non-finite values repaired on the way out),
    labels likewise (`labels_KP`), user and row ids int64 columns. Sparse feature s (key order) has
    its int64 ids in slice p at `ids_SP[s, p]`: one id per row when `offsets_SP[s]` is all 0, else row r's ids are
    ids[offsets[r] : offsets[r + 1]] (int64 offsets at `offsets_SP[s, p]`), of which the last
    `max_len_S[s]` are kept. `keep` holds every array behind these addresses. Ids of features with
    `vocab_S[s]` > 0 are raw and get hashed into [0, vocab_S[s]) on their way into a block.
    """

    n: int
    order: np.ndarray  # int64 N, a permutation of range(N)
    part_start: np.ndarray  # int64 P + 1
    ids_SP: np.ndarray  # uint64 addresses
    offsets_SP: np.ndarray  # uint64 addresses, 0 for features with one id per row
    max_len_S: np.ndarray  # int64
    vocab_S: np.ndarray  # uint64: 0 when a feature's ids are final, else the vocab size to hash them into
    memo_S: np.ndarray  # uint64: address of a feature's memo table (`ids.memo_for`), or 0
    dense_FP: np.ndarray  # uint64 addresses of float32 columns
    labels_KP: np.ndarray  # uint64 addresses of float32 columns
    user_P: np.ndarray  # uint64 addresses of int64 user ids, 0 without a user-id column
    row_P: np.ndarray  # uint64 addresses of int64 row ids, 0 without a row-id column
    keep: list[object]  # the arrays behind the addresses
    health_NC: np.ndarray | None  # int64 per-row repair counters, None when nothing was repaired


def _np(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


class _Health:
    """Per-row repair counters of a window, allocated on the first repair."""

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
    ids: np.ndarray, sf: SparseFeature, out: np.ndarray, health: _Health, a: int, lens: np.ndarray | None = None
) -> None:
    """Map the raw ids of window rows [a, ...) into `out` (`lens`: ids per row, None for one id per row);
    ids hashed into range are counted on their rows. 'hash' ids are copied: `fill_block` hashes them."""
    if sf.id_mapping == "hash":
        out[...] = ids
        return
    oor = map_ids_into(ids, sf.vocab_size, sf.id_mapping, out)
    if oor is not None:
        rows = np.arange(len(ids)) if lens is None else np.repeat(np.arange(len(lens)), lens)
        health.add(_OOR, a, np.bincount(rows[oor], minlength=len(ids) if lens is None else len(lens)))


def _list_chunk(arr: pa.Array, sf: SparseFeature, a: int, health: _Health) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int64, raw ids int64) of one list chunk of window rows [a, a + len), null lists and
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


Columns = dict[str, pa.Array]
"""One slice of a window: column name -> its values as one array."""


def _slices(parts: list[pa.Table]) -> list[Columns]:
    one = lambda col: col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()  # noqa: E731
    return [{name: one(col) for name, col in zip(t.column_names, t.columns)} for t in parts]


def _is_jagged(sf: SparseFeature, slices: list[Columns]) -> bool:
    """Lists, and scalar features with nulls in this window (bags of 0 or 1 id), need offsets."""
    return sf.max_len > 1 or any(c[sf.name].null_count for c in slices)


def _slice_ids(arr: pa.Array, sf: SparseFeature, jagged: bool, a: int, health: _Health) -> tuple[np.ndarray, ...]:
    """(ids int64, offsets int64 or nothing) of one feature in one slice (window rows a ..): views of
    Arrow's buffers when there is nothing to repair or map here (no nulls, int64 ids, 'hash' or 'raw'),
    else null lists and null ids dropped (and counted), lists truncated to their last max_len ids and
    'modulo' ids mapped (and counted) into new arrays."""
    n = len(arr)
    if sf.dtype != "string" and sf.id_mapping != "modulo" and not arr.null_count:
        if sf.max_len == 1:
            ids = np.ascontiguousarray(_np(arr), dtype=np.int64)
            return (ids, np.arange(n + 1, dtype=np.int64)) if jagged else (ids,)
        values = arr.values
        if not values.null_count and pa.types.is_int64(values.type):
            return _np(values), _np(arr.offsets).astype(np.int64)  # offsets index the unsliced values
    if sf.max_len == 1:
        raw, valid = _flat_ids(arr, sf)
        if valid is not None:
            health.add(_NULLS, a, (~valid).astype(np.int64))
            raw = raw[valid]
        lens = None if valid is None else valid.astype(np.int64)
    else:
        lens, raw = _list_chunk(arr, sf, a, health)
    ids = np.empty(len(raw), dtype=np.int64)
    _map_into(raw, sf, ids, health, a, lens)
    if not jagged:
        return (ids,)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.ones(n, np.int64) if lens is None else lens, out=offsets[1:])
    return ids, offsets


def _float_columns(
    slices: list[Columns], names: list[str], part_start: np.ndarray, health: _Health, keep: list[object]
) -> np.ndarray:
    """uint64 len(names) x P addresses of each column's float32 values per slice (nulls -> 0, counted)."""
    out = np.zeros((len(names), len(slices)), dtype=np.uint64)
    for f, name in enumerate(names):
        for p, cols in enumerate(slices):
            arr = cols[name]
            if arr.null_count:
                health.add(_NULLS, int(part_start[p]), (~np.asarray(arr.is_valid())).astype(np.int64))
                arr = arr.fill_null(0)
            values = np.ascontiguousarray(_np(arr), dtype=np.float32)
            out[f, p] = values.ctypes.data
            keep.append(values)
    return out


def _id_column(
    slices: list[Columns], name: str, part_start: np.ndarray, health: _Health, keep: list[object]
) -> np.ndarray:
    """uint64 P addresses of an int64 id column per slice (nulls -> 0, counted); zeros without a column.
    (Row ids are never null: pipeline.reader rejects them.)"""
    out = np.zeros(len(slices), dtype=np.uint64)
    for p, cols in enumerate(slices if name else []):
        arr = cols[name]
        if arr.null_count:
            health.add(_NULLS, int(part_start[p]), (~np.asarray(arr.is_valid())).astype(np.int64))
            arr = arr.fill_null(0)
        values = np.ascontiguousarray(_np(arr), dtype=np.int64)
        out[p] = values.ctypes.data
        keep.append(values)
    return out


def to_window(
    parts: list[pa.Table], data: DataConfig, features: FeaturesConfig, perm: np.ndarray | None = None
) -> Window:
    """Decode and repair the N >= 1 rows of `parts` (label-validated table slices, concatenated in this
    order) into a Window; `perm` (a permutation of range(N)) is the order rows go out in, else file order."""
    n = sum(t.num_rows for t in parts)
    health = _Health(n)
    n_parts, n_sparse = len(parts), len(features.sparse)
    part_start = np.zeros(n_parts + 1, dtype=np.int64)
    np.cumsum([t.num_rows for t in parts], out=part_start[1:])
    ids_SP = np.zeros((n_sparse, n_parts), dtype=np.uint64)
    offsets_SP = np.zeros((n_sparse, n_parts), dtype=np.uint64)
    keep: list[object] = []
    slices = _slices(parts)
    dense_FP = _float_columns(slices, features.dense, part_start, health, keep)
    labels_KP = _float_columns(slices, features.labels, part_start, health, keep)
    user_P = _id_column(slices, features.user_id, part_start, health, keep)
    row_P = _id_column(slices, data.row_id_column, part_start, health, keep)
    for s, sf in enumerate(features.sparse):
        jagged = _is_jagged(sf, slices)
        for p, cols in enumerate(slices):
            arrays = _slice_ids(cols[sf.name], sf, jagged, int(part_start[p]), health)
            ids_SP[s, p] = arrays[0].ctypes.data
            if jagged:
                offsets_SP[s, p] = arrays[1].ctypes.data
            keep.extend(arrays)
    vocab_S = np.array([sf.vocab_size if sf.id_mapping == "hash" else 0 for sf in features.sparse], dtype=np.uint64)
    memo_S = np.zeros(n_sparse, dtype=np.uint64)
    for s, v in enumerate(vocab_S.tolist()):
        table = memo_for(v, n * features.sparse[s].max_len) if v else None
        memo_S[s] = 0 if table is None else table.ctypes.data  # the tables live in `pipeline.ids` for good
    max_len_S = np.array([sf.max_len for sf in features.sparse], dtype=np.int64)
    order = perm.astype(np.int64, copy=False) if perm is not None else np.arange(n, dtype=np.int64)
    return Window(
        n, order, part_start, ids_SP, offsets_SP, max_len_S, vocab_S, memo_S, dense_FP, labels_KP, user_P, row_P, keep,
        health.nc,
    )  # fmt: skip


_ALIGN = 64


@functools.lru_cache(maxsize=256)  # a reader's blocks have a handful of headers; shared result: do not mutate
def block_sections(header: Header) -> dict[str, tuple[int, np.dtype, tuple[int, ...]]]:
    """name -> (byte offset, dtype, shape) of the arrays in a block buffer, each 64-byte aligned:
    values V int64 (batch-major, key-major inside a batch), voff J+1 int64 (batch j's ids are
    values[voff[j]:voff[j+1]]), lengths J x S x B int32, dense J x B x F, labels J x B x K, weights J x B
    float32, user, row J x B int64, stats J x (len(STATS) + 1) int64; "_total": the buffer size."""
    nb, bsz, s, f, k, v = header
    spec = [
        ("values", np.int64, (v,)), ("voff", np.int64, (nb + 1,)), ("lengths", np.int32, (nb, s, bsz)),
        ("dense", np.float32, (nb, bsz, f)), ("labels", np.float32, (nb, bsz, k)), ("weights", np.float32, (nb, bsz)),
        ("user", np.int64, (nb, bsz)), ("row", np.int64, (nb, bsz)), ("stats", np.int64, (nb, len(STATS) + 1)),
    ]  # fmt: skip
    out, total = {}, 0
    for name, dt, shape in spec:
        dt = np.dtype(dt)
        out[name] = (total, dt, shape)
        total += -(-dt.itemsize * math.prod(shape) // _ALIGN) * _ALIGN
    out["_total"] = (total, np.dtype(np.uint8), ())
    return out


def block_arrays(raw: np.ndarray, header: Header) -> dict[str, np.ndarray]:
    """Views of the arrays of a block buffer (uint8) laid out by `block_sections`."""
    out = {}
    for name, (off, dt, shape) in block_sections(header).items():
        if name != "_total":
            out[name] = raw[off : off + dt.itemsize * math.prod(shape)].view(dt).reshape(shape)
    return out


def fill_block(
    win: Window | None,
    j0: int,
    j1: int,
    batch_size: int,
    features: FeaturesConfig,
    alloc: Callable[[int], torch.Tensor],
) -> Block:
    """Batches j0 .. j1-1 of a window (batch j: rows order[j*B : (j+1)*B]), padded to B rows each with
    zero-weight rows (empty bags, zero dense and labels, user id 0, row id -1); `win` None: all padding.

    The sparse ids of all the batches come from one call of the compiled pass (`native.fill_sparse`):
    gathered in output order straight from the window's slices, hashed where `win.vocab_S` says,
    written key-major per batch.

    Args:
        alloc: returns a uint8 tensor of the given byte size (shared memory in a reader process).
    Returns:
        A Block: read it with `block_batches`.
    """
    bsz, nb = batch_size, j1 - j0
    first = j0 * bsz
    if win is None:
        win = _empty_window(features)
    order = win.order[first : first + max(0, min(nb * bsz, win.n - first))]
    sparse = (win.part_start, win.ids_SP, win.offsets_SP, win.max_len_S)
    n_ids = native.count_ids(order, *sparse)
    header: Header = (nb, bsz, len(features.sparse), len(features.dense), len(features.labels), n_ids)
    buf = alloc(block_sections(header)["_total"][0])
    arr = block_arrays(buf.numpy(), header)
    native.fill_sparse(nb, bsz, order, *sparse, win.vocab_S, win.memo_S, MEMO_IDS, arr["values"], arr["lengths"],
                       arr["voff"])  # fmt: skip
    rows = (win.part_start, win.dense_FP, win.labels_KP, win.user_P, win.row_P)
    native.fill_rows(nb, bsz, order, *rows, arr, _STATS_COLUMNS)
    if win.health_NC is not None and len(order):  # repairs made while decoding, per row
        h = np.zeros((nb * bsz, len(HEALTH)), dtype=np.int64)
        np.take(win.health_NC, order, axis=0, out=h[: len(order)], mode="clip")
        arr["stats"][:, : len(HEALTH)] += h.reshape(nb, bsz, len(HEALTH)).sum(axis=1)
    return buf, header


def _empty_window(features: FeaturesConfig) -> Window:
    """A window of no rows (one empty slice): every batch of it is padding."""
    u64 = lambda *shape: np.zeros(shape, dtype=np.uint64)  # noqa: E731
    s, f, k = len(features.sparse), len(features.dense), len(features.labels)
    return Window(
        0, np.zeros(0, np.int64), np.zeros(2, np.int64), u64(s, 1), u64(s, 1), np.ones(s, np.int64), u64(s), u64(s),
        u64(f, 1), u64(k, 1), u64(1), u64(1), [], None,
    )  # fmt: skip


_STATS_COLUMNS = (_NONFINITE, len(HEALTH), len(HEALTH) + 1, len(STATS))
"""Where `native.fill_rows` writes non-finite repairs, padded rows, real rows and the audit checksum."""


def block_batches(raw: np.ndarray, header: Header, skip: int = 0) -> Iterator[BatchArrays]:
    """Zero-copy views of the batches of a block from `fill_block` (`raw`: its buffer as a uint8 numpy
    array), from batch `skip` on; every view keeps `raw` or its base alive.

    Yields:
        values (int64, the batch's ids, key-major), lengths (int32, S * B, key-major), dense_BF,
        labels_BK, weights_B, user_ids_B, row_ids_B, stats (int64, one count per name in STATS, then
        the batch's audit checksum).
    """
    arr = block_arrays(raw, header)
    voff = arr["voff"].tolist()
    values, lengths, dense, labels = arr["values"], arr["lengths"], arr["dense"], arr["labels"]
    weights, user, row, stats = arr["weights"], arr["user"], arr["row"], arr["stats"]
    for j in range(skip, header[0]):
        yield (
            values[voff[j] : voff[j + 1]], lengths[j].reshape(-1), dense[j], labels[j], weights[j], user[j],
            row[j], stats[j],
        )  # fmt: skip
