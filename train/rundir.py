"""The run directory's own guards: one run at a time (a lock), clean metrics after a resume, preemption.

    lock = acquire_run_lock(run_dir, is_main)      # collective: every rank gets the same error
    ...
    lock.release()
    drop_rows_after(run_dir / "metrics.jsonl", step)  # a resumed run rewrites the steps after its checkpoint
    with Preemption() as stop:                      # SIGTERM / SIGUSR1 -> stop.requested
        ...

A second run on the same `training.output_dir` would interleave checkpoints, prune the other's files
and lose metrics rows: the lock (<run>/.lock: pid, host, start time) stops it with one line naming the
holder. A lock whose process is gone (same host, pid not alive: a crash, kill -9, an elastic restart)
is stale and taken over with a warning; a lock held from another host cannot be checked from here and
is reported, with how to clear it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from types import FrameType, TracebackType

from parallel.distributed import broadcast_object

LOCK_FILE = ".lock"
PREEMPTED_EXIT = 75
"""Exit code of a rank that stopped on SIGTERM / SIGUSR1 after writing its checkpoint (EX_TEMPFAIL:
try again; the next start with the same command resumes from that checkpoint)."""


class RunLockError(RuntimeError):
    """The run directory is in use by another run (the message names it)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """<run>/.lock, created exclusively by rank 0."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.held = False

    def try_acquire(self) -> tuple[str | None, str | None]:
        """(error, warning): error when another live run holds the lock; a warning when a stale one was taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        warning = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                pid, host = int(holder.get("pid", -1)), str(holder.get("host", "?"))
                if host == me["host"] and not _alive(pid):
                    warning = f"[lock] took over the stale lock {self.path} of pid {pid} (no longer running)"
                    self.path.unlink(missing_ok=True)
                    continue
                return (
                    f"{self.path.parent} is in use by pid {pid} on {host} since {holder.get('started', '?')}: two runs "
                    f"on one training.output_dir would corrupt it. Wait for it, pick another output_dir, or delete "
                    f"{self.path} if that run is gone",
                    None,
                )
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return None, warning
        return f"{self.path}: could not take the lock", None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def acquire_run_lock(run_dir: Path, is_main: bool) -> RunLock:
    """Rank 0 takes <run>/.lock; every rank raises the same RunLockError when another run holds it. Collective."""
    lock = RunLock(run_dir)
    error, warning = lock.try_acquire() if is_main else (None, None)
    error = broadcast_object(error)
    if error:
        raise RunLockError(str(error))
    if warning:
        print(warning, flush=True)
    return lock


def drop_rows_after(path: Path, step: int) -> int:
    """Remove metrics.jsonl rows logged after `step` (by a run that crashed after its last checkpoint): the
    resumed run logs those steps again. Returns the number of rows dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a row cut by the crash
            continue
        if row_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


class Preemption:
    """While active, SIGTERM and SIGUSR1 set `requested` instead of killing the process: the trainer finishes
    its step, all ranks agree (any rank signalled), write a checkpoint and exit with PREEMPTED_EXIT."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __enter__(self) -> Preemption:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


class Preempted(Exception):
    """Training stopped on a preemption signal after writing checkpoint `path`."""

    def __init__(self, path: Path, step: int) -> None:
        super().__init__(f"preempted at step {step}: wrote {path}; the same command resumes from it")
        self.path, self.step = path, step
