"""Exactly-once split of one epoch over world_size x num_workers readers.

The epoch's units (row groups), in a seeded per-epoch order, are viewed as one virtual sequence of
N rows. Every rank runs the same number of batches L:

    drop_last = True : L = N // (W * B); rank r gets rows [r*L*B, (r+1)*L*B); the tail is dropped
    drop_last = False: L = ceil(N / (W * B)); rank r gets an even contiguous share n_r (sizes differ
                       by at most one row) and pads its stream to L*B rows with zero-weight rows

Inside a rank, worker k runs L_k = L // K + (k < L % K) batches over the next L_k*B rows of the
rank's share (real rows first, padding last). Workers hand their batches out in blocks, round-robin
(`reader_positions`), so the rank's state is a single counter. Units are split at row boundaries,
so a row group may be shared by two readers.

Legend: N rows in the epoch, W world size, B batch size, J batches per rank (split over the rank's
`data.num_workers` readers, one reader when reading in-process).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.plan import DatasetPlan, WorkUnit


@dataclass(frozen=True)
class ReaderSpan:
    """What one reader (rank, worker) reads in one epoch."""

    pieces: list[WorkUnit]
    """Row ranges to read, in order; their rows total `real_rows`."""
    real_rows: int
    """Rows of data this reader yields; the rest of num_batches * B is padding."""
    num_batches: int
    """Batches this reader yields (each exactly B rows)."""


def batches_per_rank(num_rows: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """L: batches every rank runs per epoch."""
    per_step = world_size * batch_size
    return num_rows // per_step if drop_last else -(-num_rows // per_step)


def worker_batches(num_batches: int, num_workers: int) -> list[int]:
    """L_k for k in range(K): as even as possible, larger shares first (round-robin order)."""
    k = max(1, num_workers)
    return [num_batches // k + (i < num_batches % k) for i in range(k)]


def rank_rows(
    num_rows: int, world_size: int, rank: int, num_batches: int, batch_size: int, drop_last: bool
) -> tuple[int, int]:
    """(first row, row count) of the rank's real rows in the epoch's virtual sequence."""
    if drop_last:
        n = num_batches * batch_size
        return rank * n, n
    base, extra = divmod(num_rows, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def epoch_order(plan: DatasetPlan, seed: int, epoch: int, shuffle: bool) -> list[WorkUnit]:
    """Units in this epoch's order: file order, or a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return list(plan.units)
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(plan.units))
    return [plan.units[i] for i in perm]


def slice_units(units: list[WorkUnit], start: int, count: int) -> list[WorkUnit]:
    """The pieces of `units` covering virtual rows [start, start + count)."""
    if count <= 0:
        return []
    sizes = np.fromiter((u.num_rows for u in units), dtype=np.int64, count=len(units))
    ends = np.cumsum(sizes)
    begins = ends - sizes
    stop = start + count
    first = int(np.searchsorted(ends, start, side="right"))
    out = []
    for i in range(first, len(units)):
        if begins[i] >= stop:
            break
        u = units[i]
        lo = max(start, int(begins[i])) - int(begins[i])
        hi = min(stop, int(ends[i])) - int(begins[i])
        out.append(WorkUnit(u.file_index, u.row_group, u.start + lo, u.start + hi))
    return out


def dropped_units(
    plan: DatasetPlan, *, seed: int, epoch: int, shuffle: bool, world_size: int, batch_size: int, drop_last: bool
) -> list[WorkUnit]:
    """The rows no rank reads in `epoch`: with drop_last, the tail of the epoch's virtual sequence beyond
    world_size x batches x batch_size rows (fewer than world_size x batch_size); none without it."""
    if not drop_last:
        return []
    n_total = plan.num_rows
    used = batches_per_rank(n_total, world_size, batch_size, drop_last) * batch_size * world_size
    return slice_units(epoch_order(plan, seed, epoch, shuffle), used, n_total - used)


def reader_span(
    plan: DatasetPlan,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
    drop_last: bool,
) -> ReaderSpan:
    """The span of reader (rank, worker) in `epoch`; see the module docstring."""
    n_total = plan.num_rows
    num_batches = batches_per_rank(n_total, world_size, batch_size, drop_last)
    first, n_rank = rank_rows(n_total, world_size, rank, num_batches, batch_size, drop_last)
    shares = worker_batches(num_batches, num_workers)
    before = sum(shares[:worker]) * batch_size
    real = max(0, min(n_rank - before, shares[worker] * batch_size))
    pieces = slice_units(epoch_order(plan, seed, epoch, shuffle), first + before, real)
    return ReaderSpan(pieces, real, shares[worker])


def reader_positions(shares: list[int], block: int, done: int) -> tuple[list[int], int]:
    """Where each reader of a rank stands after the rank handed out `done` batches.

    Readers emit their batches in blocks of `block` (block j of reader k = its local batches
    [j*block, (j+1)*block)), visited round-robin over readers that still have batches, starting at
    reader 0. Returns (batches done per reader, the reader whose batch comes next).
    """
    k_total = len(shares)
    pos = [0] * k_total
    k, rem = 0, done
    while rem > 0:
        if pos[k] < shares[k]:
            blk = min(block, shares[k] - pos[k])
            if rem < blk:
                pos[k] += rem
                return pos, k
            pos[k] += blk
            rem -= blk
        k = (k + 1) % k_total
    return pos, k
