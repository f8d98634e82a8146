"""Session fixtures: one reusable 2-process gloo pool for every distributed check."""

from __future__ import annotations

import os

import pytest

from parallel.env import setup_env

setup_env()


@pytest.fixture(scope="session")
def dist_pool():
    """Two spawned ranks in one gloo group, started once per test session."""
    from tests.dist_pool import DistPool

    pool = DistPool(world_size=2)
    yield pool
    pool.close()


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """The synthetic click log (frozen schema of configs/tiny.toml), 6k rows in 3 uneven files."""
    from pipeline.tools.synth import main as synth_main

    out = tmp_path_factory.mktemp("tiny_data")
    synth_main(["--out", str(out), "--rows", "6000", "--files", "3", "--seed", "1", "--row-group-size", "700"])
    return str(out)
