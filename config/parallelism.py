"""Typed config section of how a job is spread over processes (`[parallelism]`)."""

from __future__ import annotations

from dataclasses import dataclass

from schema import check_range


@dataclass
class ParallelismConfig:
    """How the job is spread over processes."""

    ep_size: int = 1
    """Expert-parallel group size: each rank of a group owns num_tokens / ep_size token positions
    and all their experts. Must divide the world size and num_tokens."""

    def validate(self) -> None:
        """ep_size positive (its fit with the world size and the model is a cross-section rule)."""
        check_range(self.ep_size, "parallelism.ep_size", min=1)
