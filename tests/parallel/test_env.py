"""The environment every entry point sets up (parallel/env.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from parallel.env import clear_stale_build_locks, pin_ninja


def test_orphaned_jit_build_lock_is_removed_and_a_fresh_one_kept(tmp_path: Path, capsys) -> None:
    # A run killed while DeepSpeed JIT-builds its op leaves `lock`; torch then waits on it forever in every
    # later run (seen here: a study hung at start-up). An old lock is removed with one line; a build in
    # progress (a fresh lock) is left alone.
    old, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir()
        lock.touch()
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    assert clear_stale_build_locks(tmp_path) == [old]
    assert not old.exists() and fresh.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(old) in err[0] and "60 min ago" in err[0]
    assert clear_stale_build_locks(tmp_path / "missing") == []


def test_pin_ninja_puts_the_interpreters_ninja_first(tmp_path, monkeypatch) -> None:
    """Every process builds DeepSpeed's op with the same (pinned) ninja: another version would rebuild it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", f"/usr/bin:{bin_dir}:/bin")
    pin_ninja()  # no ninja beside the interpreter: PATH untouched
    assert os.environ["PATH"] == f"/usr/bin:{bin_dir}:/bin"
    (bin_dir / "ninja").write_text("")
    pin_ninja()
    assert os.environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"
    pin_ninja()  # idempotent
    assert os.environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"
