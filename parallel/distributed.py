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

from parallel.env import Runtime, detect_runtime, skip_shm_comm_op


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

    skip_shm_comm_op()  # unused by training; DeepSpeed would JIT-build it on CPU (parallel.env)
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


def all_gather_object(obj: object) -> list[object]:
    """Every rank's `obj` (picklable), in rank order; [obj] without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s `obj` on every rank (picklable); `obj` itself without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def average_buffers(module: torch.nn.Module, names: tuple[str, ...] = ("running_mean", "running_var")) -> None:
    """Average the named floating buffers (batch-norm running statistics) over all ranks, in place, so
    every rank evaluates and checkpoints the same model. Collective; a no-op without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    bufs = [b for n, b in module.named_buffers() if n.rsplit(".", 1)[-1] in names and b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in bufs:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
