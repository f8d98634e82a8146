"""One `parallelize`: table sharding, expert parallelism and the DeepSpeed engine, in this order.

    dist = init_distributed()                                  # process group (parallel.distributed)
    par = parallelize(cfg, dist, sparse_arch, dense_model)     # -> Parallelized
    par.dmp(kjt) ... par.engine(sparse_BI, dense_BF) ...       # two objects, never one
    par.layout.ep_rank, par.layout.expert_dp_rank              # read from DeepSpeed's own groups

Order, and why:
1. Tables: TorchRec's planner + `DistributedModelParallel` over the world group, wrapping the sparse
   arch ONLY. Wrapping the dense model too would put it under DDP: rank 0's experts would overwrite
   every other rank's at start and expert gradients would be all-reduced across expert-parallel ranks.
2. Experts: DeepSpeed's expert-parallel groups of size `parallelism.ep_size` are created, and each
   MoE layer keeps the experts of the token positions its expert-parallel rank owns
   (`parallel.expert_parallel`), marked as expert parameters for the engine.
3. Engine: `deepspeed.initialize` on the dense model (with its experts), never on the DMP (DeepSpeed
   would broadcast rank 0's table shards over the others' at start). It builds MoE optimizer groups
   and reduces expert gradients only over the expert-data-parallel group.

The layout is read back from DeepSpeed's groups rather than recomputed (`rank % ep_size`), so the
checkpoint code, which names expert shards by expert-parallel rank, always agrees with the groups the
gradients were reduced over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import groups
from torch import nn

from config import JobConfig
from embeddings.sharding import ShardingReport, shard_sparse_arch
from model.moe import moe_layers
from parallel.dense_engine import init_engine
from parallel.distributed import DistInfo
from parallel.env import Runtime
from parallel.expert_parallel import create_ep_groups, ep_group_name, shard_experts


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits: in the world, in its expert-parallel group, in its expert-data-parallel group.

    Attributes:
        rank, world_size: global rank and job size.
        ep_size, ep_rank: expert-parallel group size and this rank's place in it (which token positions'
            experts it holds, which `experts_ep<ep_rank>` shard it writes).
        expert_dp_size, expert_dp_rank: ranks holding the same expert shard, and this rank's place among
            them (rank 0 of them writes the shard).
        runtime: device and backend (parallel.env).
        restart_count: elastic restarts before this attempt.
    """

    rank: int
    world_size: int
    ep_size: int
    ep_rank: int
    expert_dp_size: int
    expert_dp_rank: int
    runtime: Runtime
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @staticmethod
    def from_groups(info: DistInfo, ep_size: int) -> ParallelLayout:
        """The layout of DeepSpeed's `ep_size_<ep_size>` groups (created if missing)."""
        create_ep_groups(ep_size)
        name = ep_group_name(ep_size)
        ep_group = groups._get_expert_parallel_group(name)
        edp_group = groups._get_expert_data_parallel_group(name)
        return ParallelLayout(
            rank=info.rank,
            world_size=info.world_size,
            ep_size=ep_size,
            ep_rank=dist.get_rank(group=ep_group),
            expert_dp_size=dist.get_world_size(group=edp_group),
            expert_dp_rank=dist.get_rank(group=edp_group),
            runtime=info.runtime,
            restart_count=info.restart_count,
        )


@dataclass
class Parallelized:
    """What `parallelize` returns: the sharded tables, the dense engine and the layout."""

    dmp: nn.Module
    """DistributedModelParallel over the sparse arch: `dmp(kjt)` -> pooled KeyedTensor (plan-dependent key order)."""
    engine: Any
    """The DeepSpeed engine over the dense model: `engine(sparse_BI, dense_BF)`, `engine.backward`, `engine.step`."""
    layout: ParallelLayout
    plan_report: ShardingReport
    expert_params_per_rank: int
    """Expert parameters this rank holds (total / ep_size with MoE, else 0)."""

    @property
    def model(self) -> nn.Module:
        """The dense model inside the engine."""
        return self.engine.module


def parallelize(
    cfg: JobConfig, info: DistInfo, sparse_arch: nn.Module, dense: nn.Module, run_dir: Path | None = None
) -> Parallelized:
    """Shard the tables, shard the experts, start the DeepSpeed engine (in that order, see the module docstring).

    Args:
        cfg: the job config (embeddings, parallelism, training sections).
        info: this process's place in the process group (`init_distributed`).
        sparse_arch: `build_sparse_arch(..., device=torch.device("meta"))`.
        dense: the zoo model on the training device, unsharded (every rank builds the same weights).
        run_dir: where the engine's ds_config.json is written (rank 0), or None.
    """
    layout = ParallelLayout.from_groups(info, cfg.parallelism.ep_size)
    dmp, report = shard_sparse_arch(
        sparse_arch, cfg.features, cfg.embeddings, device=layout.device, world_size=layout.world_size
    )
    expert_params = 0
    if moe_layers(dense):
        expert_params = shard_experts(dense, layout.ep_size, layout.ep_rank, cfg.training.seed)
    engine = init_engine(dense, cfg, run_dir if layout.is_main else None)
    return Parallelized(dmp, engine, layout, report, expert_params)
