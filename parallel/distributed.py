"""Process-group start-up and small collective helpers.

`init_distributed()` joins the default process group (or runs as a single process without torchrun),
with an elastic-restart workaround: after torchrun restarts the workers, a plain gloo
`init_process_group` failed again and again ("Gloo connectFullMesh failed": stale addresses in the
agent's store). So under torchrun's agent store we connect to
the agent's TCPStore ourselves and give gloo a fresh prefix per restart attempt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.env import Runtime, deepspeed_stdout, detect_runtime


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    runtime: Runtime
    restart_count: int
    owns_group: bool = True
    """Whether init_distributed created the process group (and so the entry point destroys it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join the job's process group (cuda + nccl or cpu + gloo, decided by parallel.env)."""
    if "MASTER_ADDR" not in os.environ:  # plain `python -m launch.train`: one process, no torchrun
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
            os.environ.setdefault(k, v)
    if "LOCAL_SIZE" in os.environ:  # the `deepspeed` launcher names it LOCAL_SIZE; TorchRec reads LOCAL_WORLD_SIZE
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["LOCAL_SIZE"])
    runtime = detect_runtime()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if runtime.device_type == "cuda":
        torch.cuda.set_device(runtime.local_rank)
    owns_group = not dist.is_initialized()
    if owns_group:
        timeout = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" not in os.environ:
            store = dist.HashStore()
            dist.init_process_group(runtime.backend, store=store, rank=0, world_size=1, timeout=timeout)
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
            )
            prefixed = dist.PrefixStore(f"attempt{restarts}", store)
            dist.init_process_group(runtime.backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(runtime.backend, rank=rank, world_size=world, timeout=timeout)
    import deepspeed

    with deepspeed_stdout():
        deepspeed.init_distributed(dist_backend=runtime.backend)
    return DistInfo(rank, world, runtime.local_rank, runtime, restarts, owns_group)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def destroy() -> None:
    """Tear down the default process group (the entry point that created it calls this)."""
    if dist.is_initialized():
        dist.destroy_process_group()
