"""Decoded pieces -> one shuffle window (addresses only) -> blocks of ready batches.

Legend: N rows in a window, B batch size, J batches in a block, F dense features, K label columns
(tasks), S sparse features (KJT keys), U pieces a window spans, V ids in a block, A repair counters.

Two steps (no per-row Python; per-batch Python only to hand out views):
1. `to_window`: a window is the rows [a, b) of one or more decoded pieces (`pipeline.decode`), in
   file order; it only records where each column of each piece starts. Nothing moves or is permuted.
2. `fill_block`: batches [j0, j1) of the window, rows in the window's shuffled order, are written
   into one contiguous buffer (`alloc`: a plain or a shared-memory tensor) by the compiled pass
   (`pipeline.native`): sparse ids gathered, hashed and laid out in KJT order, dense values (NaN/inf
   -> 0, counted), labels, weights, user and row ids and the per-batch counters. `block_batches`
   hands out zero-copy views of it.

Repairs made while decoding are counted per row in the pieces and summed per batch here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import native
from pipeline.config import FeaturesConfig
from pipeline.decode import HEALTH, NONFINITE, Piece
from pipeline.ids import MEMO_IDS, memo_for

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
    float32 column at `dense_FU[f, p]` (nulls already 0, non-finite values repaired on the way out),
    labels likewise (`labels_KU`), user and row ids int64 columns. Sparse feature s (key order) has
    its int64 ids in slice p at `ids_SU[s, p]`: one id per row when `offsets_SU[s]` is all 0, else row r's ids are
    ids[offsets[r] : offsets[r + 1]] (int64 offsets at `offsets_SU[s, p]`), of which the last
    `max_len_S[s]` are kept. `keep` holds every array behind these addresses. Ids of features with
    `vocab_S[s]` > 0 are raw and get hashed into [0, vocab_S[s]) on their way into a block.
    """

    n: int
    order: np.ndarray  # int64 N, a permutation of range(N)
    part_start: np.ndarray  # int64 P + 1
    ids_SU: np.ndarray  # uint64 addresses
    offsets_SU: np.ndarray  # uint64 addresses, 0 for features with one id per row
    max_len_S: np.ndarray  # int64
    vocab_S: np.ndarray  # uint64: 0 when a feature's ids are final, else the vocab size to hash them into
    memo_S: np.ndarray  # uint64: address of a feature's memo table (`ids.memo_for`), or 0
    dense_FU: np.ndarray  # uint64 addresses of float32 columns
    labels_KU: np.ndarray  # uint64 addresses of float32 columns
    user_U: np.ndarray  # uint64 addresses of int64 user ids, 0 without a user-id column
    row_U: np.ndarray  # uint64 addresses of int64 row ids, 0 without a row-id column
    keep: list[object]  # the arrays behind the addresses
    health_NA: np.ndarray | None  # int64 per-row repair counters, None when nothing was repaired


Slice = tuple[Piece, int, int]
"""(piece, a, b): rows [a, b) of a decoded piece."""


def to_window(slices: list[Slice], features: FeaturesConfig, perm: np.ndarray | None = None) -> Window:
    """The N >= 1 rows of `slices` (concatenated in this order) as a Window; `perm` (a permutation of
    range(N)) is the order rows go out in, else file order. Only addresses are computed: no data moves."""
    n_parts, n_sparse = len(slices), len(features.sparse)
    part_start = np.zeros(n_parts + 1, dtype=np.int64)
    np.cumsum([b - a for _, a, b in slices], out=part_start[1:])
    n = int(part_start[-1])
    pieces = [p for p, _, _ in slices]
    jagged = [sf.max_len > 1 or any(p.offsets[s] is not None for p in pieces) for s, sf in enumerate(features.sparse)]
    ids_SU = np.zeros((n_sparse, n_parts), dtype=np.uint64)
    offsets_SU = np.zeros((n_sparse, n_parts), dtype=np.uint64)
    dense_FU = np.zeros((len(features.dense), n_parts), dtype=np.uint64)
    labels_KU = np.zeros((len(features.labels), n_parts), dtype=np.uint64)
    user_U, row_U = np.zeros(n_parts, dtype=np.uint64), np.zeros(n_parts, dtype=np.uint64)
    for p, (piece, a, _) in enumerate(slices):
        a4, a8 = np.uint64(4 * a), np.uint64(8 * a)
        dense_FU[:, p] = piece.dense_addr + a4
        labels_KU[:, p] = piece.labels_addr + a4
        user_U[p] = piece.user_addr + 8 * a if piece.user_addr else 0
        row_U[p] = piece.row_addr + 8 * a if piece.row_addr else 0
        for s in range(n_sparse):  # bags: ids stay put, the offsets start at row a; else ids start at row a
            if jagged[s]:
                ids_SU[s, p] = piece.ids_addr[s]
                offsets_SU[s, p] = piece.with_offsets(s) + 8 * a
            else:
                ids_SU[s, p] = piece.ids_addr[s] + a8
    health_NA = None
    if any(p.health_NA is not None for p, _, _ in slices):
        zeros = lambda a, b: np.zeros((b - a, len(HEALTH)), dtype=np.int64)  # noqa: E731
        health_NA = np.concatenate([zeros(a, b) if p.health_NA is None else p.health_NA[a:b] for p, a, b in slices])
    vocab_S = np.array([sf.vocab_size if sf.id_mapping == "hash" else 0 for sf in features.sparse], dtype=np.uint64)
    memo_S = np.zeros(n_sparse, dtype=np.uint64)
    for s, v in enumerate(vocab_S.tolist()):
        table = memo_for(v, n * features.sparse[s].max_len) if v else None
        memo_S[s] = 0 if table is None else table.ctypes.data  # the tables live in `pipeline.ids` for good
    max_len_S = np.array([sf.max_len for sf in features.sparse], dtype=np.int64)
    order = perm.astype(np.int64, copy=False) if perm is not None else np.arange(n, dtype=np.int64)
    return Window(
        n, order, part_start, ids_SU, offsets_SU, max_len_S, vocab_S, memo_S, dense_FU, labels_KU, user_U, row_U,
        pieces, health_NA,
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
    sparse = (win.part_start, win.ids_SU, win.offsets_SU, win.max_len_S)
    plan, n_ids = native.plan_block(nb, bsz, order, win.part_start, win.offsets_SU, win.max_len_S)
    header: Header = (nb, bsz, len(features.sparse), len(features.dense), len(features.labels), n_ids)
    buf = alloc(block_sections(header)["_total"][0])
    arr = block_arrays(buf.numpy(), header)
    native.fill_sparse(nb, bsz, len(order), plan, *sparse, win.vocab_S, win.memo_S, MEMO_IDS, arr["values"],
                       arr["lengths"], arr["voff"])  # fmt: skip
    rows = (win.part_start, win.dense_FU, win.labels_KU, win.user_U, win.row_U)
    native.fill_rows(nb, bsz, len(order), plan, *rows, arr, _STATS_COLUMNS)
    if win.health_NA is not None and len(order):  # repairs made while decoding, per row
        h = np.zeros((nb * bsz, len(HEALTH)), dtype=np.int64)
        np.take(win.health_NA, order, axis=0, out=h[: len(order)], mode="clip")
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


_STATS_COLUMNS = (NONFINITE, len(HEALTH), len(HEALTH) + 1, len(STATS))
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
