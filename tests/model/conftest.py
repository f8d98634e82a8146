"""Model tests run tiny shapes: one intra-op thread avoids oversubscription on a shared 2-core box
(a 25-step toy training took 8 s with 2 contended threads, 0.05 s with 1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
