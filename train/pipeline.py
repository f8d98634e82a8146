"""The training input pipeline: batch i+1 is copied to the device and its embedding input distribution
started while step i computes.

    batches = PrefetchLoader(loader, device, dmp, enabled=cfg.training.pipeline)
    for batch in batches:                          # already on the device
        step_fn(batch, step, lookup=batches.take_lookup(), after_embed=batches.prefetch_next)

Order inside step i: finish batch i's lookup (ids already distributed) -> `prefetch_next()`: take batch
i+1 from the loader, copy it to the device (on a side CUDA stream; pinned host memory), start its input
all-to-all (`embeddings.pipelining.start_lookup`) -> step i's dense forward, backward (the tables'
fused update), optimizer step. The ids of batch i+1 travel while step i computes; its embeddings are
looked up at step i+1, after step i's update, so every loss equals the plain loop's (tested).

The wrapper reports the loader's state as of the batches *trained on*, not the one held ahead: its
`state_dict`, `batches_done`, `epoch`, `audit` and `stats` are snapshots taken before each pull, so a
checkpoint at step i resumes at batch i+1 exactly as without pipelining.

With `enabled` False, or tables that cannot be split (managed collision), it is the plain loop: one
batch at a time, copied when taken.

Legend: B batch per rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from embeddings.pipelining import StartedLookup, pipelinable, start_lookup
from pipeline.batch import Batch
from pipeline.loader import ParquetLoader


class PrefetchLoader:
    """A `ParquetLoader` that holds one batch ahead on the device with its lookup started.

    Args:
        loader: the training loader.
        device: the training device (from `parallel.env`).
        dmp: the sharded tables; their input dist is started ahead when `pipelinable(dmp)`.
        enabled: `training.pipeline`; False gives the plain loop.
    """

    def __init__(self, loader: ParquetLoader, device: torch.device, dmp: nn.Module, enabled: bool = True) -> None:
        self.loader, self.device, self.dmp = loader, device, dmp
        self.ahead = enabled
        self.split_lookup = enabled and pipelinable(dmp)
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self._it: Iterator[Batch] | None = None
        self._next: tuple[Batch, StartedLookup | None] | None = None
        self._pulled = True
        self._lookup: StartedLookup | None = None
        self._now: dict[str, Any] | None = None  # the loader as of the batches trained on (None: the loader itself)
        self._after_next: dict[str, Any] | None = None

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        if not self.ahead:
            for batch in self.loader:
                self._lookup = None
                yield batch.to(self.device, non_blocking=True)
            return
        self._it = iter(self.loader)
        self._now = self._snapshot()  # nothing trained on yet this epoch
        self._pull()
        try:
            while self._next is not None:
                batch, self._lookup = self._next
                self._next, self._pulled, self._now = None, False, self._after_next
                yield batch
                self.prefetch_next()  # the step did not ask for it (e.g. a step that raised and was retried)
        finally:
            self._it = None
            self._next = None

    def prefetch_next(self) -> None:
        """Take the next batch, copy it to the device and start its lookup (once per step; a no-op when
        off or already done). Collective when the lookup is split: every rank calls it at the same step."""
        if self.ahead and not self._pulled and self._it is not None:
            self._pulled = True
            self._pull()

    def take_lookup(self) -> StartedLookup | None:
        """The current batch's started lookup (None: look it up whole); handed out once."""
        lookup, self._lookup = self._lookup, None
        return lookup

    def _pull(self) -> None:
        assert self._it is not None
        # `_now` already describes the batches trained on: the loader has not moved since the last pull
        host = next(self._it, None)
        self._after_next = self._snapshot()
        if host is None:
            self._next = None
            return
        if self.stream is not None:  # the copy runs beside the compute queued on the main stream
            with torch.cuda.stream(self.stream):
                batch = host.to(self.device, non_blocking=True)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            batch.record_stream(torch.cuda.current_stream(self.device))
        else:
            batch = host.to(self.device, non_blocking=True)
        self._next = (batch, start_lookup(self.dmp, batch.sparse) if self.split_lookup else None)

    def _snapshot(self) -> dict[str, Any]:
        ld = self.loader
        return {
            "state": ld.state_dict(),
            "batches_done": ld.batches_done,
            "epoch": ld.epoch,
            "audit": ld.audit(),
            "stats": ld.stats(),
        }

    # ------------------------------------------------------------------ the loader's interface
    def _view(self, key: str) -> Any:
        return self._now[key] if self._now is not None else None

    def state_dict(self) -> dict:
        """The loader's state as of the batches trained on."""
        return self._view("state") if self._now is not None else self.loader.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self._now = None
        self.loader.load_state_dict(sd)

    def set_epoch(self, epoch: int) -> None:
        self._now = None
        self.loader.set_epoch(epoch)

    @property
    def batches_done(self) -> int:
        return self._view("batches_done") if self._now is not None else self.loader.batches_done

    @property
    def epoch(self) -> int:
        return self._view("epoch") if self._now is not None else self.loader.epoch

    def audit(self) -> dict:
        return self._view("audit") if self._now is not None else self.loader.audit()

    def stats(self) -> dict[str, int]:
        return self._view("stats") if self._now is not None else self.loader.stats()

    def __len__(self) -> int:
        return len(self.loader)
