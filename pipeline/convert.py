"""Arrow table -> columnar numpy rows -> the arrays of one batch, all vectorised (no per-row loops).

Legend: N rows in a window, B batch size, J batches in a window, F dense features, K label columns
(tasks), S sparse features, R of them with exactly one id per row, C health counters.

Repairs happen here and are counted per row (so every batch knows exactly what it carried):
NaN/inf dense values -> 0 (`dense_nonfinite_repaired`), null dense/id/user values -> 0 or an empty bag
(`nulls_repaired`), ids hashed into range by 'modulo' mapping (`ids_out_of_range`). Labels are
validated where the file and row group are known (pipeline.reader), never repaired.
"""

from __future__ import annotations

from dataclasses import dataclass

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.config import DataConfig, FeaturesConfig, SparseFeature
from pipeline.ids import hash_strings, map_ids_counted, mix64

HEALTH = ("dense_nonfinite_repaired", "nulls_repaired", "ids_out_of_range")
"""Per-row counters carried by every chunk, in this column order."""
_NONFINITE, _NULLS, _OOR = range(3)
STATS = (*HEALTH, "padded_rows", "rows")
"""Per-batch counters returned by `window_batch`, in this order; the stats array carries one more
entry after them: the batch's audit checksum (sum of mix64(row id) mod 2**64, as int64 bits)."""

BatchArrays = tuple[np.ndarray, ...]
"""(values, lengths, dense_BF, labels_BK, weights_B, user_ids_B, row_ids_B, stats): see `window_batch`.
Numpy, not tensors: a reader process packs a block of them into one shared-memory buffer
(`pipeline.loader`), instead of one shared-memory segment per tensor."""


@dataclass
class Window:
    """N decoded, repaired rows in their (permuted) order, ready to be cut into batches of B rows.

    Batch j holds rows [j*B, min((j+1)*B, N)). Sparse feature s of that batch: a row of the
    batch-major block `blocks_JRB[j, slot[s]]` when the feature has exactly one id per row in this
    window ("simple"), else `values[s][offsets[s][lo]:offsets[s][hi]]` (lists, scalars with nulls).
    """

    n: int
    batch_size: int
    dense_NF: np.ndarray  # float32
    labels_NK: np.ndarray  # float32
    user_N: np.ndarray  # int64
    row_N: np.ndarray  # int64 (-1 when no row-id column)
    lengths_SN: np.ndarray  # int32, permuted
    blocks_JRB: np.ndarray  # int64, simple features' ids, batch-major (R simple features)
    slot: list[int]  # per sparse feature: its row in blocks_JRB, or -1 when jagged
    values: list[np.ndarray | None]  # per jagged feature: permuted ids
    offsets: list[np.ndarray | None]  # per jagged feature: N + 1 offsets into values
    health_JC: np.ndarray  # int64, per batch sums of the health counters and (last) the audit checksum

    @property
    def num_batches(self) -> int:
        return -(-self.n // self.batch_size)


def _np(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False) if isinstance(col, pa.Array) else col.to_numpy()


def _single(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def _ints(arr: pa.Array, sf: SparseFeature) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids int64, valid mask or None when no nulls) of a flat id array."""
    if sf.dtype == "string":
        ids, valid = hash_strings(arr)
        return ids, (valid if arr.null_count else None)
    if arr.null_count:
        valid = np.asarray(arr.is_valid())
        return _np(arr.fill_null(0)).astype(np.int64, copy=False), valid
    return _np(arr).astype(np.int64, copy=False), None


def _sparse(col: pa.ChunkedArray, sf: SparseFeature, health_NC: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(lengths int32 N, or None when every row has exactly one id; values int64) of one sparse
    feature, ids mapped into [0, vocab_size), lists truncated to their last max_len ids."""
    arr = _single(col)
    n = len(arr)
    if sf.max_len == 1:
        ids, valid = _ints(arr, sf)
        lengths = None
        if valid is not None:
            lengths = valid.astype(np.int32)
            health_NC[:, _NULLS] += ~valid
            ids = ids[valid]
    else:
        if arr.null_count:
            health_NC[:, _NULLS] += ~np.asarray(arr.is_valid())
        lengths = _np(pc.list_value_length(arr).fill_null(0)).astype(np.int64)
        ids, valid = _ints(arr.flatten(), sf)
        if valid is not None:  # null ids inside lists are dropped and counted
            dropped = np.bincount(np.repeat(np.arange(n), lengths)[~valid], minlength=n)
            health_NC[:, _NULLS] += dropped
            lengths = lengths - dropped
            ids = ids[valid]
        if n and lengths.max() > sf.max_len:  # keep the last max_len ids of each row
            keep = np.minimum(lengths, sf.max_len)
            shift = np.cumsum(lengths) - np.cumsum(keep)  # first kept id of a row minus its new offset
            ids = ids[np.repeat(shift, keep) + np.arange(int(keep.sum()))]
            lengths = keep
        lengths = lengths.astype(np.int32)
    mapped, oor = map_ids_counted(ids, sf.vocab_size, sf.id_mapping)
    if oor.any():
        rows = np.arange(n) if lengths is None else np.repeat(np.arange(n), lengths)
        health_NC[:, _OOR] += np.bincount(rows[oor], minlength=n)
    return lengths, mapped


def _dense(table: pa.Table, names: list[str], health_NC: np.ndarray) -> np.ndarray:
    n = table.num_rows
    out = np.empty((n, len(names)), dtype=np.float32)
    nulls = None
    for j, name in enumerate(names):
        col = table.column(name)
        if col.null_count:
            nulls = np.zeros(out.shape, dtype=bool) if nulls is None else nulls
            nulls[:, j] = ~np.asarray(_single(col).is_valid())
        out[:, j] = _np(col)  # nulls arrive as NaN and are zeroed below
    finite = np.isfinite(out)
    if not finite.all():
        if nulls is not None:
            health_NC[:, _NULLS] += nulls.sum(axis=1)
            finite |= nulls
        health_NC[:, _NONFINITE] += (~finite).sum(axis=1)
        out[~np.isfinite(out)] = 0.0
    return out


def _int_column(table: pa.Table, name: str, health_NC: np.ndarray) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        health_NC[:, _NULLS] += ~np.asarray(_single(col).is_valid())
        col = col.fill_null(0)
    return _np(col).astype(np.int64, copy=False)


def _permute_jagged(values: np.ndarray, lengths: np.ndarray, perm32: np.ndarray) -> np.ndarray:
    """The id segments of rows perm[0], perm[1], ... (row i has lengths[i] ids), with fbgemm's
    permute_1D_sparse_data (about 3x faster than the numpy equivalent)."""
    t = torch.from_numpy
    return torch.ops.fbgemm.permute_1D_sparse_data(t(perm32), t(lengths), t(values), None, len(values))[1].numpy()


def to_window(
    table: pa.Table, data: DataConfig, features: FeaturesConfig, batch_size: int, perm: np.ndarray | None = None
) -> Window:
    """Decode and repair a (label-validated) table of N >= 1 rows, in the order `perm` (a permutation
    of range(N)) when given, laid out for batches of `batch_size`. Labels must already be 0/1."""
    n, bsz = table.num_rows, batch_size
    order = perm if perm is not None else np.arange(n)
    order32 = order.astype(np.int32)
    health_NC = np.zeros((n, len(HEALTH)), dtype=np.int64)
    labels_NK = np.empty((n, len(features.labels)), dtype=np.float32)
    for k, name in enumerate(features.labels):
        labels_NK[:, k] = _np(table.column(name))
    dense_NF = _dense(table, features.dense, health_NC)
    user_N = _int_column(table, features.user_id, health_NC) if features.user_id else np.zeros(n, np.int64)
    row_N = _np(table.column(data.row_id_column)).astype(np.int64) if data.row_id_column else np.full(n, -1)
    lengths_SN = np.ones((len(features.sparse), n), dtype=np.int32)
    simple: list[np.ndarray] = []
    slot, values, offsets = [], [], []
    for s, sf in enumerate(features.sparse):
        lengths, vals = _sparse(table.column(sf.name), sf, health_NC)
        if lengths is None:
            slot.append(len(simple))
            simple.append(vals)
            values.append(None)
            offsets.append(None)
            continue
        lengths_SN[s] = lengths
        off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths[order], out=off[1:])
        slot.append(-1)
        values.append(_permute_jagged(vals, lengths, order32))
        offsets.append(off)
    # simple features: one gather straight into batch-major layout (batch, feature, row)
    nb = -(-n // bsz)
    padded = np.zeros(nb * bsz, dtype=np.int64)
    padded[:n] = order
    if simple:
        flat_RN = np.stack(simple)
        index = (np.arange(len(simple), dtype=np.int64) * n)[None, :, None] + padded.reshape(nb, 1, bsz)
        blocks_JRB = flat_RN.reshape(-1)[index]
    else:
        blocks_JRB = np.zeros((nb, 0, bsz), dtype=np.int64)
    starts = np.arange(0, n, bsz)
    health_JC = np.empty((nb, len(HEALTH) + 1), dtype=np.int64)
    health_JC[:, :-1] = np.add.reduceat(health_NC[order], starts, axis=0)
    row_N = row_N[order]
    health_JC[:, -1] = np.add.reduceat(mix64(row_N), starts).view(np.int64) if data.row_id_column else 0
    return Window(
        n, bsz, dense_NF[order], labels_NK[order], user_N[order], row_N, lengths_SN[:, order],
        blocks_JRB, slot, values, offsets, health_JC,
    )  # fmt: skip


def padding_batch(features: FeaturesConfig, batch_size: int) -> BatchArrays:
    """A batch of `batch_size` zero-weight padding rows only (see `window_batch`)."""
    b, s = batch_size, len(features.sparse)
    return (
        np.zeros(0, np.int64), np.zeros(s * b, np.int32), np.zeros((b, len(features.dense)), np.float32),
        np.zeros((b, len(features.labels)), np.float32), np.zeros(b, np.float32), np.zeros(b, np.int64),
        np.full(b, -1, np.int64), np.array([0] * len(HEALTH) + [b, 0, 0], np.int64),
    )  # fmt: skip


def window_batch(win: Window, j: int) -> BatchArrays:
    """Batch j of the window, padded to batch_size rows with zero-weight rows (empty bags, zero dense
    and labels, user id 0, row id -1).

    Returns:
        values (int64, all ids key-major), lengths (int32, S * B, key-major), dense_BF, labels_BK,
        weights_B, user_ids_B, row_ids_B, stats (int64, one count per name in STATS).
    """
    bsz = win.batch_size
    lo = j * bsz
    n = min(bsz, win.n - lo)
    hi, pad = lo + n, bsz - n
    block = win.blocks_JRB[j]
    pieces = [
        block[r, :n] if r >= 0 else v[o[lo] : o[hi]]  # type: ignore[index]
        for r, v, o in zip(win.slot, win.values, win.offsets)
    ]
    values = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    lengths = np.zeros((win.lengths_SN.shape[0], bsz), dtype=np.int32)
    lengths[:, :n] = win.lengths_SN[:, lo:hi]
    arrays = [win.dense_NF[lo:hi], win.labels_NK[lo:hi], win.user_N[lo:hi], win.row_N[lo:hi]]
    weights = np.ones(bsz, np.float32)
    if pad:
        fill = (0.0, 0.0, 0, -1)
        arrays = [np.concatenate([a, np.full((pad, *a.shape[1:]), f, a.dtype)]) for a, f in zip(arrays, fill)]
        weights[n:] = 0.0
    h = win.health_JC[j]
    stats = np.concatenate([h[:-1], [pad, n, h[-1]]]).astype(np.int64)
    dense, labels, user, row = arrays
    return values, lengths.reshape(-1), dense, labels, weights, user, row, stats
