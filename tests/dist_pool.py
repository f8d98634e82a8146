"""A reusable pool of N spawned worker processes joined in one gloo process group.

Importing torch + torchrec + deepspeed costs tens of seconds per process on 2 cores, so the test
session starts this pool once and runs every 2-process check inside it:

    results = dist_pool.run(my_module.worker_fn, arg1, arg2)   # one result per rank

`worker_fn` must be a module-level function (picklable by reference). It runs on every rank at once,
with torch.distributed already initialised (gloo, CPU); its return values come back in rank order.
An exception on any rank is re-raised here with that rank's traceback. A rank that does not answer
within `timeout` seconds (a hung collective) fails the call and the pool is restarted on next use.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    from parallel.env import setup_env  # noqa: PLC0415  (sets DS_ACCELERATOR etc. before torch loads)

    setup_env()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            out = fn(*args, **kwargs)
            results.put((rank, "ok", out))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    """`world_size` spawned processes in one gloo group; see the module docstring."""

    def __init__(self, world_size: int = 2, timeout: float = 300.0) -> None:
        self.world_size = world_size
        self.timeout = timeout
        self._procs: list[Any] = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, port, self._tasks[r], self._results), daemon=True)
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        for _ in range(self.world_size):
            rank, status, _ = self._results.get(timeout=self.timeout)
            if status != "ready":
                raise RuntimeError(f"pool rank {rank} failed to start")
        self.broken = False

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run `fn(*args, **kwargs)` on every rank; return the results in rank order."""
        if self.broken:
            self.close()
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        out: list[Any] = [None] * self.world_size
        errors: list[str] = []
        for _ in range(self.world_size):
            try:
                rank, status, value = self._results.get(timeout=self.timeout)
            except queue.Empty:
                self.broken = True
                raise TimeoutError(f"{fn.__name__}: a rank did not answer within {self.timeout}s") from None
            if status == "ok":
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
        if errors:
            # A failed rank may leave the others mid-collective state; restart before the next use.
            self.broken = True
            raise RuntimeError(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return out

    def close(self) -> None:
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._procs = []
