"""The sparse half of a checkpoint: sharded tables + fused optimizer state through
torch.distributed.checkpoint (DCP), loadable under another world size or plan (DCP reshards).

The trainer owns the layout (directory per step, atomic rename, pruning); it calls:

    save_sparse(dmp, f"{ckpt_dir}/sparse")      # collective: every rank of the DMP's group
    load_sparse(dmp, f"{ckpt_dir}/sparse")      # collective; dmp may be planned differently

The fused optimizer state must travel with the tables: forgetting it shows up a step after resume.
Managed-collision tables also carry their id-remapping buffers in `dmp.state_dict()`; those are
resumed on the same world size (their per-shard sorted id arrays are not meant to be resharded).
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.distributed.model_parallel import DistributedModelParallel


def _group(dmp: DistributedModelParallel) -> dist.ProcessGroup | None:
    return dmp._env.process_group  # the group DMP was sharded over (a subgroup in tests)


def sparse_state_dict(dmp: DistributedModelParallel) -> dict[str, Any]:
    """{"model": tables (+ MC buffers), "optim": fused optimizer state}, as ShardedTensors of local shards.

    The tensors are views of the live kernels' storage: DCP loads into them in place.
    """
    return {"model": dmp.state_dict(), "optim": dmp.fused_optimizer.state_dict()}


def save_sparse(dmp: DistributedModelParallel, path: str) -> None:
    """Save tables and fused optimizer state to the DCP directory `path` (collective over the DMP's group)."""
    dcp.save(sparse_state_dict(dmp), checkpoint_id=path, process_group=_group(dmp))


def load_sparse(dmp: DistributedModelParallel, path: str) -> None:
    """Load tables and fused optimizer state from `path` into `dmp` (collective; any world size / plan).

    Raises:
        FileNotFoundError: `path` has no DCP metadata (names the path).
    """
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"sparse checkpoint '{path}': no .metadata file (not a DCP checkpoint)")
    state = sparse_state_dict(dmp)
    dcp.load(state, checkpoint_id=path, process_group=_group(dmp))
    dmp.load_state_dict(state["model"])
    dmp.fused_optimizer.load_state_dict(state["optim"])
