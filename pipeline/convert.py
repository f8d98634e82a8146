"""Arrow row-group slices -> one shuffle window of hashed numpy columns -> blocks of ready batches.

Legend: N rows in a window, B batch size, J batches in a block, F dense features, K label columns
(tasks), S sparse features, R scalar sparse features, C health counters, V ids in a block.

Two steps, both vectorised (no per-row Python; per-batch Python only to place each batch's ids):
1. `to_window`: the table slices of a window are decoded column chunk by column chunk, ids hashed
   straight into the window's buffers (`ids.map_ids_into`), in file order. Nothing is permuted here.
2. `fill_block`: batches [j0, j1) of the window, rows in the window's shuffled order, are gathered
   once each, straight into one contiguous buffer (`alloc`: a plain or a shared-memory tensor), from
   which `block_batches` hands out zero-copy views.

Repairs happen in step 1 and are counted per row (so every batch knows exactly what it carried):
NaN/inf dense values -> 0 (`dense_nonfinite_repaired`), null dense/id/user values -> 0 or an empty bag
(`nulls_repaired`), ids hashed into range by 'modulo' mapping (`ids_out_of_range`). Labels are
validated where the file and row group are known (pipeline.reader), never repaired.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.config import DataConfig, FeaturesConfig, SparseFeature
from pipeline.ids import hash_strings, map_ids_into, mix64

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
    """N decoded, repaired rows of one shuffle window in file order, ids already mapped; `order` is the
    (shuffled) order in which they go out.

    Sparse feature s is "simple" in this window when it has exactly one id per row (a scalar feature
    without nulls): its ids are row `slot[s]` of `simple_RN`. The other features (lists, scalars with
    nulls) are jagged (`slot[s]` = -1): one jagged array of G x N + 1 segments for the G jagged features
    in key order, segment g * N + i holding the ids of jagged feature g in row i, the last one empty.
    """

    n: int
    order: np.ndarray  # int64 N, a permutation of range(N)
    dense_NF: np.ndarray  # float32
    labels_NK: np.ndarray  # float32
    user_N: np.ndarray  # int64
    row_N: np.ndarray  # int64 (-1 when no row-id column)
    mixed_N: np.ndarray | None  # uint64 mix64(row ids) for the audit, None without a row-id column
    slot: list[int]  # per sparse feature: its row in simple_RN, or -1 when jagged
    simple_RN: np.ndarray  # int64 R x N
    jag_lengths: np.ndarray  # int32 G * N + 1
    jag_values: np.ndarray  # int64, the jagged segments' ids in segment order
    health_NC: np.ndarray | None  # int64 per-row repair counters, None when nothing was repaired


def _np(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


Chunks = list[tuple[int, pa.Array]]
"""(first row in the window, array) of every non-empty chunk of one column across a window's slices."""


def _columns(parts: list[pa.Table]) -> dict[str, Chunks]:
    """Column name -> its chunks, for every column of the window's slices (one pass, no copies)."""
    out: dict[str, Chunks] = {name: [] for name in parts[0].column_names}
    a = 0
    for t in parts:
        for name, col in zip(t.column_names, t.columns):
            b = a
            for chunk in col.chunks:
                if len(chunk):
                    out[name].append((b, chunk))
                b += len(chunk)
        a += t.num_rows
    return out


def _has_nulls(chunks: Chunks) -> bool:
    return any(arr.null_count for _, arr in chunks)


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
    ids hashed into range are counted on their rows."""
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


def _jagged(
    chunks: Chunks, sf: SparseFeature, lengths: np.ndarray, health: _Health
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Fill `lengths` (int32 N) of a list feature, or of a scalar feature with nulls (lengths 0/1), and
    return its (first row, lengths, raw ids) per column chunk."""
    pieces = []
    for a, arr in chunks:
        if sf.max_len == 1:
            ids, valid = _flat_ids(arr, sf)
            if valid is not None:
                health.add(_NULLS, a, (~valid).astype(np.int64))
                ids = ids[valid]
            lens = np.ones(len(arr), np.int64) if valid is None else valid.astype(np.int64)
        else:
            lens, ids = _list_chunk(arr, sf, a, health)
        lengths[a : a + len(arr)] = lens
        pieces.append((a, lens, ids))
    return pieces


def to_window(
    parts: list[pa.Table], data: DataConfig, features: FeaturesConfig, perm: np.ndarray | None = None
) -> Window:
    """Decode and repair the N >= 1 rows of `parts` (label-validated table slices, concatenated in this
    order) into a Window; `perm` (a permutation of range(N)) is the order rows go out in, else file order."""
    n = sum(t.num_rows for t in parts)
    cols = _columns(parts)
    health = _Health(n)
    labels_NK = np.empty((n, len(features.labels)), dtype=np.float32)
    for k, name in enumerate(features.labels):
        for a, arr in cols[name]:
            labels_NK[a : a + len(arr), k] = _np(arr)
    dense_NF = np.empty((n, len(features.dense)), dtype=np.float32)
    nulls_NF = None
    for j, name in enumerate(features.dense):
        for a, arr in cols[name]:
            dense_NF[a : a + len(arr), j] = _np(arr)  # nulls arrive as NaN and are zeroed below
            if arr.null_count:
                nulls_NF = np.zeros(dense_NF.shape, dtype=bool) if nulls_NF is None else nulls_NF
                nulls_NF[a : a + len(arr), j] = ~np.asarray(arr.is_valid())
    if not np.isfinite(dense_NF).all():
        bad_NF = ~np.isfinite(dense_NF)
        if nulls_NF is not None:
            health.add(_NULLS, 0, nulls_NF.sum(axis=1))
            bad_NF &= ~nulls_NF
        health.add(_NONFINITE, 0, bad_NF.sum(axis=1))
        dense_NF[~np.isfinite(dense_NF)] = 0.0
    user_N = np.zeros(n, dtype=np.int64)
    if features.user_id:
        for a, arr in cols[features.user_id]:
            if arr.null_count:
                health.add(_NULLS, a, (~np.asarray(arr.is_valid())).astype(np.int64))
                arr = arr.fill_null(0)
            user_N[a : a + len(arr)] = _np(arr)
    row_N = np.full(n, -1, dtype=np.int64)
    mixed_N = None
    if data.row_id_column:
        for a, arr in cols[data.row_id_column]:
            row_N[a : a + len(arr)] = _np(arr)
        mixed_N = mix64(row_N)
    simple = [sf.max_len == 1 and not _has_nulls(cols[sf.name]) for sf in features.sparse]
    simple_RN = np.empty((sum(sf.max_len == 1 for sf in features.sparse), n), dtype=np.int64)
    jag_lengths = np.empty(n * simple.count(False) + 1, np.int32)
    jag_lengths[-1] = 0
    slot: list[int] = []
    jagged: list[tuple[SparseFeature, list[tuple[int, np.ndarray, np.ndarray]]]] = []
    r = 0  # scalar features keep their row of simple_RN (by config order) whether simple or not
    for sf, is_simple in zip(features.sparse, simple):
        if is_simple:
            for a, arr in cols[sf.name]:
                ids, _ = _flat_ids(arr, sf)
                _map_into(ids, sf, simple_RN[r, a : a + len(arr)], health, a)
            slot.append(r)
        else:
            g = len(jagged)
            jagged.append((sf, _jagged(cols[sf.name], sf, jag_lengths[g * n : (g + 1) * n], health)))
            slot.append(-1)
        r += sf.max_len == 1
    jag_values = np.empty(sum(len(ids) for _, pieces in jagged for _, _, ids in pieces), dtype=np.int64)
    pos = 0
    for sf, pieces in jagged:
        for a, lens, ids in pieces:
            _map_into(ids, sf, jag_values[pos : pos + len(ids)], health, a, lens)
            pos += len(ids)
    order = perm.astype(np.int64, copy=False) if perm is not None else np.arange(n, dtype=np.int64)
    return Window(
        n, order, dense_NF, labels_NK, user_N, row_N, mixed_N, slot, simple_RN, jag_lengths, jag_values, health.nc
    )  # fmt: skip


_ALIGN = 64


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
        total += -(-dt.itemsize * int(np.prod(shape, dtype=np.int64)) // _ALIGN) * _ALIGN
    out["_total"] = (total, np.dtype(np.uint8), ())
    return out


def block_arrays(raw: np.ndarray, header: Header) -> dict[str, np.ndarray]:
    """Views of the arrays of a block buffer (uint8) laid out by `block_sections`."""
    out = {}
    for name, (off, dt, shape) in block_sections(header).items():
        if name != "_total":
            size = dt.itemsize * int(np.prod(shape, dtype=np.int64))
            out[name] = raw[off : off + size].view(dt).reshape(shape)
    return out


def _runs(slot: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive features of one kind, in key order: (first feature, count, first
    simple_RN row or -1 for jagged). Simple runs are consecutive rows of simple_RN."""
    runs: list[tuple[int, int, int]] = []
    for s, r in enumerate(slot):
        if runs and (r >= 0) == (runs[-1][2] >= 0):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, runs[-1][2])
        else:
            runs.append((s, 1, r))
    return runs


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

    Jagged ids of every batch come out of one fbgemm permute_1D_sparse_data over the window's jagged
    segments, in (batch, feature, row) order; simple ids are gathered per batch straight into place.

    Args:
        alloc: returns a uint8 tensor of the given byte size (shared memory in a reader process).
    Returns:
        A Block: read it with `block_batches`.
    """
    bsz, nb = batch_size, j1 - j0
    rows = nb * bsz
    first = j0 * bsz
    s_total = len(features.sparse)
    n_real = 0 if win is None else max(0, min(rows, win.n - first))
    nj = np.clip((0 if win is None else win.n) - first - np.arange(nb) * bsz, 0, bsz)  # real rows per batch
    order = win.order[first : first + n_real] if win is not None else np.zeros(0, np.int64)
    jag_counts = np.zeros(nb, dtype=np.int64)
    jag_values = jag_lengths = None
    runs = _runs(win.slot) if win is not None else []
    if win is not None and win.jag_values is not None and len(win.jag_lengths) > 1:
        g_total = (len(win.jag_lengths) - 1) // win.n
        # segment of (batch j, jagged feature g, row i): g * N + order[j*B + i]; padding rows -> the empty one
        src = np.zeros(rows, dtype=np.int32)
        src[:n_real] = order
        seg_JGB = np.empty((nb, g_total, bsz), dtype=np.int32)
        np.add(src.reshape(nb, 1, bsz), (np.arange(g_total, dtype=np.int32) * win.n)[None, :, None], out=seg_JGB)
        if n_real < rows:
            full, part = divmod(n_real, bsz)
            seg_JGB[full, :, part:] = g_total * win.n
            seg_JGB[full + 1 :] = g_total * win.n
        t = torch.from_numpy
        lens_t, vals_t, _ = torch.ops.fbgemm.permute_1D_sparse_data(
            t(seg_JGB.reshape(-1)), t(win.jag_lengths), t(win.jag_values), None
        )
        jag_lengths, jag_values = lens_t.numpy().reshape(nb, g_total, bsz), vals_t.numpy()
        jag_counts = jag_lengths.reshape(nb, -1).sum(axis=1, dtype=np.int64)
    simple_count = 0 if win is None else sum(r >= 0 for r in win.slot)
    per_batch = nj * simple_count + jag_counts
    header: Header = (nb, bsz, s_total, len(features.dense), len(features.labels), int(per_batch.sum()))
    buf = alloc(block_sections(header)["_total"][0])
    arr = block_arrays(buf.numpy(), header)
    voff = arr["voff"]
    voff[0] = 0
    np.cumsum(per_batch, out=voff[1:])
    _fill_lengths(arr["lengths"], win, nj, jag_lengths)
    _fill_rows(arr, win, order, n_real)
    _fill_stats(arr["stats"], win, order, nj, bsz)
    if win is not None and n_real:
        _fill_values(arr["values"], win, order, runs, nj.tolist(), voff.tolist(), jag_lengths, jag_values, bsz)
    return buf, header


def _fill_lengths(lengths_JSB: np.ndarray, win: Window | None, nj: np.ndarray, jag_JGB: np.ndarray | None) -> None:
    if win is None:
        lengths_JSB[...] = 0
        return
    real_J1B = (np.arange(lengths_JSB.shape[2])[None, :] < nj[:, None])[:, None, :]
    g = 0
    for s, count, r in _runs(win.slot):  # slices, not fancy indexing: a few block copies
        if r >= 0:
            lengths_JSB[:, s : s + count] = real_J1B
        else:
            lengths_JSB[:, s : s + count] = jag_JGB[:, g : g + count]  # type: ignore[index]
            g += count


def _fill_stats(stats: np.ndarray, win: Window | None, order: np.ndarray, nj: np.ndarray, bsz: int) -> None:
    """Per batch: health sums, padded rows, real rows and the audit checksum."""
    nb, n_real = len(nj), len(order)
    stats[:, : len(HEALTH)] = 0
    stats[:, len(HEALTH)] = bsz - nj
    stats[:, len(HEALTH) + 1] = nj
    stats[:, -1] = 0
    if win is None or not n_real:
        return
    if win.health_NC is not None:
        h = np.zeros((nb * bsz, len(HEALTH)), dtype=np.int64)
        np.take(win.health_NC, order, axis=0, out=h[:n_real], mode="clip")
        stats[:, : len(HEALTH)] = h.reshape(nb, bsz, len(HEALTH)).sum(axis=1)
    if win.mixed_N is not None:
        m = np.zeros(nb * bsz, dtype=np.uint64)
        np.take(win.mixed_N, order, out=m[:n_real], mode="clip")
        stats[:, -1] = m.reshape(nb, bsz).sum(axis=1, dtype=np.uint64).view(np.int64)  # wraps: mod 2**64


def _fill_rows(arr: dict[str, np.ndarray], win: Window | None, order: np.ndarray, n_real: int) -> None:
    """dense, labels, weights, user and row ids of the block: real rows gathered, padding rows filled."""
    # explicit row counts: reshape(-1, 0) is ambiguous when there are no labels (scoring) or no dense features
    flat = lambda a: a.reshape(a.shape[0] * a.shape[1], a.shape[2])  # noqa: E731
    dense, labels = flat(arr["dense"]), flat(arr["labels"])
    weights, user, row = arr["weights"].reshape(-1), arr["user"].reshape(-1), arr["row"].reshape(-1)
    if win is not None and n_real:
        np.take(win.dense_NF, order, axis=0, out=dense[:n_real], mode="clip")
        np.take(win.labels_NK, order, axis=0, out=labels[:n_real], mode="clip")
        np.take(win.user_N, order, out=user[:n_real], mode="clip")
        np.take(win.row_N, order, out=row[:n_real], mode="clip")
    weights[:n_real] = 1.0
    for a, fill in ((dense, 0.0), (labels, 0.0), (weights, 0.0), (user, 0), (row, -1)):
        a[n_real:] = fill


def _fill_values(
    values: np.ndarray,
    win: Window,
    order: np.ndarray,
    runs: list[tuple[int, int, int]],
    nj: list[int],
    voff: list[int],
    jag_JGB: np.ndarray | None,
    jag_values: np.ndarray | None,
    bsz: int,
) -> None:
    """Each batch's ids, key-major: a simple run is one gather of its rows of simple_RN, a jagged run one
    copy of the permuted jagged ids (contiguous: they come out in (batch, feature, row) order)."""
    plan = []  # per run: (first simple row, count) or (-1, first jagged feature, count)
    g = 0
    for _, count, r in runs:
        plan.append((r, count, g))
        if r < 0:
            g += count
    if jag_JGB is not None:  # ids per (batch, jagged feature), and where each batch's jagged ids start
        per_JG = jag_JGB.sum(axis=2, dtype=np.int64)
        jstart = np.zeros(len(nj) + 1, dtype=np.int64)
        np.cumsum(per_JG.sum(axis=1), out=jstart[1:])
        per_jg, jstart_l = per_JG.tolist(), jstart.tolist()
    for j, n in enumerate(nj):
        if n == 0:
            continue
        pos, rows = voff[j], order[j * bsz : j * bsz + n]
        for r, count, g in plan:
            if r >= 0:
                np.take(
                    win.simple_RN[r : r + count],
                    rows,
                    axis=1,
                    out=values[pos : pos + count * n].reshape(count, n),
                    mode="clip",
                )
                pos += count * n
            else:
                p = jstart_l[j] + sum(per_jg[j][:g])
                c = sum(per_jg[j][g : g + count])
                values[pos : pos + c] = jag_values[p : p + c]  # type: ignore[index]
                pos += c


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
