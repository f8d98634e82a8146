"""ParquetLoader: the exactly-once, resumable stream of `Batch`es one rank trains on.

    plan = plan_dataset(cfg.data.train, cfg.data, cfg.features)
    loader = ParquetLoader(plan, cfg.data, cfg.features, rank=r, world_size=w, batch_size=256,
                           seed=0, shuffle=True, drop_last=True, num_workers=2)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)          # no-op when resuming inside this epoch
        for batch in loader:             # the rest of the epoch; len(loader) batches in all
            ...
            ckpt["loader"] = loader.state_dict()

Every rank gets exactly `len(loader)` batches of exactly `batch_size` rows per epoch (the split is
in pipeline.split, the readers in pipeline.reader). The state is the epoch plus one counter
(batches handed out this epoch). With num_workers = K > 0 the K readers of a rank run in torch
DataLoader worker processes, each sending blocks of one shuffle window of batches (one
shared-memory buffer each, recycled through a small ring once the trainer drops the batches: see
`_Ring`), which the DataLoader returns round-robin in order; `split.reader_positions` turns the counter back into every
reader's position, and the loader rotates worker ids on resume so the order continues exactly as
in an uninterrupted run (a fresh process included).

An `__iter__` that starts at the end of an epoch moves on to the next epoch by itself.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.audit import MOD, dataset_audit
from pipeline.batch import Batch
from pipeline.config import DataConfig, FeaturesConfig
from pipeline.convert import STATS, BatchArrays, Block, Header, block_batches
from pipeline.errors import DataError
from pipeline.ids import mix64, oov_dropout, warm_memo
from pipeline.plan import DatasetPlan
from pipeline.reader import iter_reader, private_block, window_rows
from pipeline.split import batches_per_rank, reader_positions, reader_span, worker_batches
from pipeline.vocab import IdVocab

__all__ = ["ParquetLoader", "dataset_audit"]

_STATE_VERSION = 1


def worker_message(e: Exception) -> str:
    """The one line a reader process raised: DataLoader re-raises it as "Caught DataError in DataLoader worker
    process 0. Original Traceback ... DataError: <line>"; the line alone is what names the file and column."""
    text = str(e)
    marker = "DataError: "
    return text.rsplit(marker, 1)[1].strip() if "Original Traceback" in text and marker in text else text


def _as_is(x: tuple[torch.Tensor, Header, int]) -> tuple[torch.Tensor, Header, int]:
    return x


def _worker_init(_: int) -> None:
    """Keep glibc from returning freed buffers to the OS in reader processes: each window allocates
    and frees megabytes, and without this every allocation page-faults fresh memory (measured: ~20x
    more page faults and ~30% more CPU per reader). No-op where glibc is not available."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: serve buffers up to 32 MiB from the heap
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD: keep up to 512 MiB of free heap mapped
    except (OSError, AttributeError):
        pass


def _shared(nbytes: int) -> torch.Tensor:
    """A uint8 tensor allocated straight in shared memory (`share_memory_()` would allocate privately and
    copy): a reader process writes each block once, the trainer maps it without a copy."""
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    return torch.empty(0, dtype=torch.uint8).set_(storage)[:nbytes]


_RING = 4
"""Block buffers each reader recycles: the DataLoader keeps at most 2 blocks per reader in flight, the
trainer holds one and the reader fills one; more is memory for nothing (a block is ~9 MB at the
default config), fewer means fresh, page-faulting buffers."""


class _Ring:
    """The block buffers of one reader (a reader process, or the trainer itself with num_workers 0:
    `new` allocates private memory then), reused once the trainer has released them.

    Fresh shared memory costs a zero-filling page fault per 4 KiB on first write (measured: a third of
    a reader's CPU). `released` (int8, this reader's `_RING` slots, shared with the trainer) is set to 1
    by the trainer when the last view of a block from slot k dies (`_track`); only then is buffer k
    written again. With no released buffer of the right size, and all slots taken (a trainer holding
    on to many batches), a block gets fresh memory that is never recycled (slot -1)."""

    def __init__(self, released: np.ndarray, new: Callable[[int], torch.Tensor] = _shared):
        self.released, self.new, self.bufs, self.slot = released, new, [], -1

    def alloc(self, nbytes: int) -> torch.Tensor:
        for k, buf in enumerate(self.bufs):
            if self.released[k] and buf.numel() >= nbytes:
                self.released[k], self.slot = 0, k
                return buf[:nbytes]
        if len(self.bufs) < len(self.released):
            self.slot = len(self.bufs)
            self.released[self.slot] = 0
            self.bufs.append(self.new(nbytes + nbytes // 4))  # headroom: block sizes vary a little
            return self.bufs[-1][:nbytes]
        self.slot = -1
        return self.new(nbytes)


def _track(buf: torch.Tensor, slot: int, released: np.ndarray, keep: dict[int, torch.UntypedStorage]) -> np.ndarray:
    """Trainer side of `_Ring`: the block buffer as numpy, with `slot` flagged released when its last
    view dies; the slot's storage stays mapped so that its next block needs no new mapping. Every view
    of the returned array holds it or its base (numpy collapses view chains), and it holds its base: the
    finalizer goes on the base, the one object that outlives them all (not on `buf`, which `numpy()`
    does not reference)."""
    raw = buf.numpy()
    if slot >= 0:
        keep[slot] = buf.untyped_storage()
        weakref.finalize(raw.base if raw.base is not None else raw, released.__setitem__, slot, 1)
    return raw


class _Readers(IterableDataset):
    """The K reader processes of one rank. Each DataLoader item is one block of a reader's batches
    (a shuffle window's worth, in one recycled shared-memory buffer: few, large messages) and its
    `_Ring` slot. DataLoader worker d runs reader (d + first) % K, `first` being the reader whose block
    comes next, so that the DataLoader's round-robin continues the uninterrupted order after a resume."""

    def __init__(self, loader: ParquetLoader, epoch: int, done: int, released: torch.Tensor):
        self.loader, self.epoch, self.released = loader, epoch, released
        shares = worker_batches(len(loader), loader.num_workers)
        self.positions, self.first = reader_positions(shares, loader.block, done)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Header, int]]:
        info = get_worker_info()
        d = info.id if info is not None else 0
        k = (d + self.first) % len(self.positions)
        ring = _Ring(self.released.numpy()[d * _RING : (d + 1) * _RING])
        for buf, header in self.loader._reader(self.epoch, k, self.positions[k], ring.alloc):
            yield buf, header, (d * _RING + ring.slot if ring.slot >= 0 else -1)


class ParquetLoader:
    """Iterable of `pipeline.batch.Batch`; one `__iter__` yields the rest of the current epoch.

    Args:
        plan: the dataset (`plan_dataset`), identical on every rank.
        data: `shuffle_window`, `prefetch_row_groups` and `row_id_column` are read from it.
        features: columns and id mapping; KJT keys are `features.sparse` names in config order.
        rank, world_size: this rank's place; every rank builds its own loader.
        batch_size: rows per batch (B); every batch has exactly B rows (padding has weight 0).
        seed: shuffle seed (units per (seed, epoch), rows per (seed, epoch, reader, window)).
        shuffle: shuffle units and rows within windows; False keeps file order (eval).
        drop_last: drop the uneven tail of the epoch (True) or pad it with zero-weight rows (False).
        num_workers: reader processes (0: read in this process).
        pin_memory: page-locked batches for asynchronous copies (only done when CUDA is available).
        vocabs: the id vocabularies (`pipeline.vocab`) by table; required when a feature has
            id_mapping = 'vocab' (training, evaluation and prediction pass the run's own).
        train: a training loader: applies `features.sparse[i].oov_dropout` (never set for evaluation).
    Raises:
        DataError when the dataset is too small to give every rank a batch.
    """

    def __init__(
        self,
        plan: DatasetPlan,
        data: DataConfig,
        features: FeaturesConfig,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        num_workers: int,
        pin_memory: bool = False,
        vocabs: dict[str, IdVocab] | None = None,
        train: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        missing = sorted({sf.table_name for sf in features.sparse if sf.id_mapping == "vocab"} - set(vocabs or {}))
        if missing:
            raise ValueError(f"features with id_mapping = 'vocab' need the vocabularies of tables {missing}")
        self.vocabs = vocabs
        self._drops = [
            (s, sf.oov_dropout, sf.oov_buckets) for s, sf in enumerate(features.sparse) if train and sf.oov_dropout > 0
        ]  # fmt: skip
        """(key, probability, oov rows) of the 'vocab' features whose ids a training loader drops to OOV."""
        self.plan, self.data, self.features = plan, data, features
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.shuffle, self.drop_last, self.num_workers = seed, shuffle, drop_last, num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.keys = [sf.name for sf in features.sparse]
        self.block = window_rows(data.shuffle_window, batch_size) // batch_size
        """Batches per message from a reader process (one shuffle window)."""
        self._len = batches_per_rank(plan.num_rows, world_size, batch_size, drop_last)
        if self._len == 0:
            raise DataError(
                f"{plan.uri}: {plan.num_rows} rows are fewer than world_size x batch_size = "
                f"{world_size} x {batch_size}; every rank would get 0 batches per epoch"
            )
        self._epoch = 0
        self._done = 0
        self._audit = [0, 0]  # count, checksum
        self._stats = dict.fromkeys(STATS, 0)

    # ----------------------------------------------------------------------------------- epochs
    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning; a no-op when already in `epoch` (so a resumed job can call
        it and keep its position)."""
        if epoch != self._epoch:
            self._epoch, self._done, self._audit = epoch, 0, [0, 0]

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_done(self) -> int:
        """Batches handed out in the current epoch."""
        return self._done

    # ----------------------------------------------------------------------------------- reading
    def _reader(
        self, epoch: int, worker: int, start: int, alloc: Callable[[int], torch.Tensor] = private_block
    ) -> Iterator[Block]:
        span = reader_span(
            self.plan,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
        )
        reader_id = self.rank * max(1, self.num_workers) + worker
        yield from iter_reader(
            self.plan,
            span,
            self.data,
            self.features,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=epoch,
            reader_id=reader_id,
            start_batch=start,
            alloc=alloc,
            vocabs=self.vocabs,
        )

    def _source(self) -> Iterator[BatchArrays]:
        blocks: Iterable[tuple[torch.Tensor, Header, int]]
        if self.num_workers == 0:  # recycled private buffers: fresh ones would page-fault every block
            flags = np.zeros(_RING, dtype=np.int8)
            ring = _Ring(flags, private_block)
            blocks = ((buf, header, ring.slot) for buf, header in self._reader(self._epoch, 0, self._done, ring.alloc))
        else:
            warm_memo(sorted({sf.vocab_size for sf in self.features.sparse if sf.id_mapping == "hash"}))  # fork-shared
            released = torch.zeros(self.num_workers * _RING, dtype=torch.int8).share_memory_()
            flags = released.numpy()
            blocks = DataLoader(
                _Readers(self, self._epoch, self._done, released),
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_as_is,  # blocks arrive as (shared-memory buffer, header, slot), unconverted
                worker_init_fn=_worker_init,
                persistent_workers=False,
            )
        keep: dict[int, torch.UntypedStorage] = {}
        try:
            for buf, header, slot in blocks:
                raw = _track(buf, slot, flags, keep)
                del buf
                yield from block_batches(raw, header)
                del raw
        except DataError as e:  # from a reader process, DataLoader prefixes the worker's whole traceback
            raise DataError(worker_message(e)) from None

    def _to_batch(self, arrays: BatchArrays) -> Batch:
        values, lengths, dense, labels, weights, user_ids, row_ids, stats = arrays
        counts = stats.tolist()
        for name, v in zip(STATS, counts):
            self._stats[name] += v
        self._audit[0] += counts[STATS.index("rows")]
        self._audit[1] = (self._audit[1] + counts[-1]) % MOD  # the batch's checksum (int64 bits of a uint64)
        t = torch.from_numpy
        if self._drops:  # the same drops for the same (seed, epoch, rank, batch): resumes stay exact
            salt = 0
            for part in (self.seed, self._epoch, self.rank, self._done):  # chained: order matters
                salt = int(mix64(np.array([salt ^ part], np.uint64))[0])
            values = oov_dropout(values, lengths.reshape(len(self.keys), -1), self._drops, salt)
        kjt = KeyedJaggedTensor(keys=self.keys, values=t(values), lengths=t(lengths))
        batch = Batch(
            sparse=kjt, dense=t(dense), labels=t(labels), weights=t(weights), user_ids=t(user_ids), row_ids=t(row_ids)
        )
        return batch.pin_memory() if self.pin_memory else batch

    def __iter__(self) -> Iterator[Batch]:
        if self._done >= self._len:
            self.set_epoch(self._epoch + 1)
        source = self._source()
        try:
            for arrays in source:
                batch = self._to_batch(arrays)
                self._done += 1
                yield batch
        finally:
            source.close()  # shuts reader processes down when an epoch is abandoned

    # ----------------------------------------------------------------------------------- state
    def _config_key(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "window": window_rows(self.data.shuffle_window, self.batch_size),
            "plan": list(self.plan.fingerprint()),
        }

    def state_dict(self) -> dict:
        """Epoch, batches handed out, audit and counters: plain Python values (torch.save / weights_only safe)."""
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "batches_done": self._done,
            "audit_count": self._audit[0],
            "audit_checksum": self._audit[1],
            "stats": dict(self._stats),
            "config": self._config_key(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Continue exactly where `sd` was taken. Raises ValueError naming the setting that differs
        (resume needs the same data, world size, workers, batch size, seed and shuffle settings)."""
        if sd.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state version {sd.get('version')!r}; expected {_STATE_VERSION}")
        mine = self._config_key()
        for key, value in sd["config"].items():
            if mine.get(key) != value:
                raise ValueError(
                    f"loader state was saved with {key}={value!r} but this loader has {key}={mine.get(key)!r}; "
                    "exact resume needs the same data, world size, num_workers, batch size, seed and shuffle settings"
                )
        self._epoch, self._done = int(sd["epoch"]), int(sd["batches_done"])
        self._audit = [int(sd["audit_count"]), int(sd["audit_checksum"])]
        self._stats = dict.fromkeys(STATS, 0) | {k: int(v) for k, v in sd["stats"].items()}

    # ----------------------------------------------------------------------------------- health
    def stats(self) -> dict[str, int]:
        """Data-health counters on this rank so far (across epochs and resumes): dense_missing,
        nulls_repaired, ids_out_of_range, padded_rows, rows (real rows read), bad_files_skipped."""
        return {**self._stats, "bad_files_skipped": len(self.plan.skipped)}

    def audit(self) -> dict:
        """{"epoch", "count", "checksum"} of the real row ids handed out this epoch on this rank."""
        return {"epoch": self._epoch, "count": self._audit[0], "checksum": self._audit[1]}
