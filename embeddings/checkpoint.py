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

from checkpoint.format import CheckpointError
from checkpoint.safe_dcp import SafeFileSystemReader, dcp_error


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
        CheckpointError: `path` has no DCP metadata, or it cannot be read safely (one line naming the path).
    """
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{path}: no DCP .metadata file (not a sparse checkpoint)")
    state = sparse_state_dict(dmp)
    try:  # metadata through the restricted unpickler: a crafted .metadata cannot run code
        dcp.load(state, storage_reader=SafeFileSystemReader(path), process_group=_group(dmp))
    except CheckpointError:
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        raise dcp_error(path, e) from None
    dmp.load_state_dict(state["model"])
    dmp.fused_optimizer.load_state_dict(state["optim"])
