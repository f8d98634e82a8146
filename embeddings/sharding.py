"""Shard the sparse arch with TorchRec's planner + DistributedModelParallel, sparse optimizer fused into backward.

    dmp, report = shard_sparse_arch(build_sparse_arch(f, e, device=torch.device("meta")), f, e,
                                    device=runtime.device, world_size=dist.get_world_size())
    x_BI = pooled_to_model_input(dmp(batch.sparse), f)      # dense model stays OUTSIDE the DMP

Sharding types, verified on CPU with gloo (2 ranks; tests/embeddings/test_sharded.py):
pooled outputs and one fused-SGD step matched a single-process EmbeddingBagCollection for
table_wise, column_wise, table_column_wise, row_wise and table_row_wise. Not usable here:
- data_parallel: TorchRec gives DP tables the dense kernel, which the fused optimizer does not
  update (the weights stayed unchanged after backward); rejected on every device.
- grid_shard: runs on CPU but its pooled outputs differ from the reference; rejected on CPU.
TorchRec's EmbeddingBagCollectionSharder only offers row_wise/table_row_wise on CUDA; on CPU this
module's sharder offers them too, because they work on gloo (its reduce-scatter is available here).
Managed-collision tables are row-wise only (TorchRec's ManagedCollisionCollectionSharder).
'auto' plans among the verified types only, on every device (`auto_sharding_types`); on CUDA the
planner's HBM per device comes from the device or `embeddings.hbm_cap_gb` (`hbm_cap_bytes`), and tables
that do not fit may use the UVM-caching kernel (`compute_kernels`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
from torchrec.distributed.mc_modules import ManagedCollisionCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan

from embeddings.config import SHARDING_TYPES, SPARSE_OPTIMIZERS, EmbeddingsConfig
from embeddings.tables import SparseArch, TableSpec, init_rows_
from pipeline.config import FeaturesConfig

CPU_SHARDING_TYPES = ["table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise"]
"""Sharding types verified on CPU + gloo (see the module docstring); 'auto' plans among these on CPU."""
CUDA_SHARDING_TYPES = CPU_SHARDING_TYPES + ["grid_shard"]
"""Types a user may name on CUDA: every type TorchRec's sharder offers except data_parallel."""
VERIFIED_SHARDING_TYPES = {"cpu": CPU_SHARDING_TYPES, "cuda": CPU_SHARDING_TYPES}
"""What 'auto' may pick on each device: only types whose outputs this project checked against the
unsharded reference (tests/embeddings/test_sharded.py, on CPU + gloo; the same TorchRec sharding code runs
on CUDA with FBGEMM's CUDA kernels). grid_shard gave wrong outputs on CPU and was never checked on a GPU,
so on CUDA it runs only when named explicitly."""
CUDA_KERNELS = ["fused", "fused_uvm_caching"]
"""Compute kernels the planner may use on CUDA: tables in HBM, or rows in host memory with an HBM cache
when they do not fit `embeddings.hbm_cap_gb`. CPU has one kernel, 'fused'."""
assert set(CUDA_SHARDING_TYPES) | {"auto"} == set(SHARDING_TYPES), "sharding types out of step with the config"
REJECTED = {
    "data_parallel": "TorchRec's data-parallel tables use the dense kernel, which the fused sparse optimizer "
    "never updates (their weights stay unchanged after backward)",
    "grid_shard": "on CPU/gloo TorchRec's grid sharding gives pooled outputs that differ from the unsharded reference",
}
OPTIMIZERS = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "sgd": EmbOptimType.EXACT_SGD,
    "adam": EmbOptimType.ADAM,
}
"""FBGEMM's optimizer for each name of `embeddings.config.SPARSE_OPTIMIZERS` (exactly those)."""
assert tuple(OPTIMIZERS) == SPARSE_OPTIMIZERS, "embeddings/sharding.py: OPTIMIZERS must match SPARSE_OPTIMIZERS"
CPU_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
"""FBGEMM's CPU kernels support only these (its 'adam' asserts "not supported in CPU mode")."""


WORLD_ONLY = ("table_row_wise", "grid_shard")
"""TorchRec builds these types' intra/cross-node groups from the WORLD group (comm.intra_and_cross_node_pg),
whatever process group DMP was given: they are only offered when sharding over the whole world."""


def allowed_sharding_types(device_type: str, whole_world: bool = True) -> list[str]:
    """Sharding types a user may name on `device_type` ('cpu' or 'cuda'), over the whole world or
    (`whole_world=False`) a subgroup."""
    types = CUDA_SHARDING_TYPES if device_type == "cuda" else CPU_SHARDING_TYPES
    return [t for t in types if whole_world or t not in WORLD_ONLY]


def auto_sharding_types(device_type: str, whole_world: bool = True) -> list[str]:
    """The types 'auto' plans among: the allowed ones this project verified (`VERIFIED_SHARDING_TYPES`)."""
    verified = VERIFIED_SHARDING_TYPES["cuda" if device_type == "cuda" else "cpu"]
    return [t for t in allowed_sharding_types(device_type, whole_world) if t in verified]


def compute_kernels(device_type: str) -> list[str]:
    """FBGEMM kernels the planner may choose on `device_type`."""
    return list(CUDA_KERNELS) if device_type == "cuda" else ["fused"]


def hbm_cap_bytes(emb: EmbeddingsConfig, device: torch.device) -> int | None:
    """HBM per device the planner may fill: `embeddings.hbm_cap_gb`, else the device's total memory; None on
    CPU (the planner's DDR default applies)."""
    if device.type != "cuda":
        return None
    if emb.hbm_cap_gb > 0:
        return int(emb.hbm_cap_gb * 2**30)
    return int(torch.cuda.mem_get_info(device)[1])


class _EmbeddingBagSharder(EmbeddingBagCollectionSharder):
    """TorchRec's EBC sharder, offering exactly `allowed_sharding_types(device)` (row_wise on CPU too)."""

    def __init__(self, fused_params: dict[str, Any], whole_world: bool) -> None:
        super().__init__(fused_params=fused_params)
        self._whole_world = whole_world

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return allowed_sharding_types(compute_device_type, self._whole_world)


def fused_params(emb: EmbeddingsConfig, device_type: str = "cpu") -> dict[str, Any]:
    """FBGEMM fused-optimizer params for the sharders (optimizer applied inside backward)."""
    if emb.optimizer not in OPTIMIZERS:
        raise ValueError(f"embeddings.optimizer: '{emb.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
    if device_type != "cuda" and emb.optimizer not in CPU_OPTIMIZERS:
        raise ValueError(
            f"embeddings.optimizer = '{emb.optimizer}' is CUDA-only: FBGEMM's CPU kernels support "
            f"{', '.join(CPU_OPTIMIZERS)}"
        )
    if emb.lr <= 0 or emb.eps <= 0:
        raise ValueError(f"embeddings.lr and embeddings.eps must be positive, got lr={emb.lr}, eps={emb.eps}")
    params: dict[str, Any] = {"optimizer": OPTIMIZERS[emb.optimizer], "learning_rate": emb.lr}
    if emb.optimizer != "sgd":
        params["eps"] = emb.eps
    return params


def make_sharders(
    emb: EmbeddingsConfig, device_type: str = "cpu", whole_world: bool = True
) -> list[ModuleSharder[nn.Module]]:
    """The EBC sharder and the managed-collision EBC sharder, both with the fused optimizer."""
    fp = fused_params(emb, device_type)
    return [
        _EmbeddingBagSharder(fp, whole_world),
        ManagedCollisionEmbeddingBagCollectionSharder(
            ebc_sharder=_EmbeddingBagSharder(fp, whole_world), mc_sharder=ManagedCollisionCollectionSharder()
        ),
    ]


def _check_type(value: str, key: str, device_type: str, whole_world: bool = True) -> str:
    if value in REJECTED and (value == "data_parallel" or device_type != "cuda"):
        raise ValueError(f"{key} = '{value}' is not supported here: {REJECTED[value]}")
    allowed = allowed_sharding_types(device_type, whole_world)
    if value not in allowed:
        where = device_type if whole_world else f"{device_type} over a subgroup"
        raise ValueError(f"{key} = '{value}': expected 'auto' or one of {', '.join(allowed)} on {where}")
    return value


def _cw_min_partition(dim: int, world_size: int) -> int | None:
    """Column-shard width that splits `dim` over the ranks (a multiple of 4 dividing dim), else None."""
    for parts in range(min(world_size, dim // 4), 1, -1):
        if dim % parts == 0 and (dim // parts) % 4 == 0:
            return dim // parts
    return None


def make_constraints(
    specs: list[TableSpec],
    features: FeaturesConfig,
    emb: EmbeddingsConfig,
    device_type: str,
    world_size: int,
    whole_world: bool = True,
) -> dict[str, ParameterConstraints]:
    """Planner constraints per table from `embeddings.sharding` / `embeddings.table_sharding`.

    Raises:
        ValueError: an unknown table in table_sharding, an unsupported type, or a managed-collision table
            asked to be sharded other than row-wise.
    """
    names = {s.name for s in specs}
    for t in emb.table_sharding:
        if t not in names:
            raise ValueError(f"embeddings.table_sharding.{t}: unknown table; tables: {', '.join(sorted(names))}")
    if emb.sharding != "auto":
        _check_type(emb.sharding, "embeddings.sharding", device_type, whole_world)
    max_len = {f.name: f.max_len for f in features.sparse}
    out: dict[str, ParameterConstraints] = {}
    for s in specs:
        key = f"embeddings.table_sharding.{s.name}" if s.name in emb.table_sharding else "embeddings.sharding"
        value = emb.table_sharding.get(s.name, emb.sharding)
        if value == "auto":
            types = auto_sharding_types(device_type, whole_world)
        else:
            types = [_check_type(value, key, device_type, whole_world)]
        if s.managed_collision:
            if value not in ("auto", "row_wise"):
                raise ValueError(f"{key} = '{value}': table '{s.name}' is managed-collision, which is row_wise only")
            types = ["row_wise"]
        min_partition = (
            _cw_min_partition(s.dim, world_size) if {"column_wise", "table_column_wise"} & set(types) else None
        )
        out[s.name] = ParameterConstraints(
            sharding_types=types,
            compute_kernels=compute_kernels(device_type),
            min_partition=min_partition,
            pooling_factors=[float(max_len[n]) for n in s.feature_names],
        )
    return out


@dataclass
class ShardReport:
    """One shard of a table: rows [row0, row0 + rows) x columns [col0, col0 + cols) on `rank`."""

    rank: int
    row0: int
    col0: int
    rows: int
    cols: int


@dataclass
class TableReport:
    """Where one table lives."""

    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    shards: list[ShardReport] = field(default_factory=list)


@dataclass
class ShardingReport:
    """The sharding plan in words and bytes: per table placement, fp32 bytes per rank of tables and of
    the fused optimizer state (`optimizer_state_bytes`)."""

    world_size: int
    optimizer: str
    tables: dict[str, TableReport]
    table_bytes_per_rank: list[int]
    optimizer_bytes_per_rank: list[int]
    plan_text: str = ""

    @staticmethod
    def from_plan(plan: ShardingPlan, specs: list[TableSpec], optimizer: str, world_size: int) -> ShardingReport:
        """Build the report from TorchRec's plan (identical on every rank after collective_plan)."""
        by_name = {s.name: s for s in specs}
        tables: dict[str, TableReport] = {}
        table_bytes = [0] * world_size
        optim_bytes = [0] * world_size
        for module_plan in plan.plan.values():
            for name, ps in module_plan.items():  # type: ignore[attr-defined]
                spec = by_name[name]
                tr = TableReport(ps.sharding_type, ps.compute_kernel, sorted(set(ps.ranks or [])))
                if ps.sharding_spec is None:  # replicated: a full copy on every rank
                    metas = [(r, [0, 0], [spec.num_embeddings, spec.dim]) for r in range(world_size)]
                else:
                    metas = [
                        (m.placement.rank(), m.shard_offsets, m.shard_sizes)  # type: ignore[union-attr]
                        for m in ps.sharding_spec.shards  # type: ignore[attr-defined]
                    ]
                for rank, off, size in metas:
                    tr.shards.append(ShardReport(rank, off[0], off[1], size[0], size[1]))
                    table_bytes[rank] += 4 * size[0] * size[1]
                    optim_bytes[rank] += optimizer_state_bytes(optimizer, size[0], size[1])
                tables[name] = tr
        return ShardingReport(world_size, optimizer, tables, table_bytes, optim_bytes, str(plan))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for the run directory)."""
        return asdict(self)

    def text(self) -> str:
        """The plan as a table, then bytes per rank (printing it on rank 0 is the trainer's job)."""
        lines = [
            f"sparse sharding plan: {len(self.tables)} tables on {self.world_size} ranks, optimizer {self.optimizer}"
        ]
        lines.append(f"{'table':<16} {'type':<18} {'ranks':<10} shards (rank:rows x cols @ row,col)")
        for name, t in self.tables.items():
            shards = " ".join(f"{s.rank}:{s.rows}x{s.cols}@{s.row0},{s.col0}" for s in t.shards)
            lines.append(f"{name:<16} {t.sharding_type:<18} {','.join(map(str, t.ranks)):<10} {shards}")
        for r in range(self.world_size):
            tb, ob = self.table_bytes_per_rank[r], self.optimizer_bytes_per_rank[r]
            lines.append(f"rank {r}: tables {tb / 2**20:.2f} MiB + optimizer state {ob / 2**20:.2f} MiB")
        return "\n".join(lines)


def optimizer_state_bytes(optimizer: str, rows: int, cols: int) -> int:
    """fp32 bytes of fused optimizer state for one R x C shard (FBGEMM's layout; the CPU optimizers are
    checked against the live state in tests/embeddings/test_plan.py, adam's 2 x R x C is CUDA-only)."""
    per = {"rowwise_adagrad": rows, "adagrad": rows * cols, "sgd": 0, "adam": 2 * rows * cols}
    return 4 * per[optimizer]


@torch.no_grad()
def init_local_shards_(dmp: nn.Module, specs: list[TableSpec], seed: int) -> None:
    """Deterministic, plan-independent init of this rank's table shards (same values as unsharded)."""
    by_name = {s.name: s for s in specs}
    for key, value in dmp.state_dict().items():
        parts = key.split(".")
        if len(parts) < 3 or parts[-1] != "weight" or parts[-3] != "embedding_bags":
            continue
        spec = by_name[parts[-2]]
        if hasattr(value, "local_shards"):
            for shard in value.local_shards():
                row0, col0 = shard.metadata.shard_offsets
                init_rows_(shard.tensor, spec.name, spec.num_embeddings, row0, col0, spec.dim, seed)
        else:
            init_rows_(value, spec.name, spec.num_embeddings, 0, 0, spec.dim, seed)


def shard_sparse_arch(
    module: nn.Module,
    features: FeaturesConfig,
    emb: EmbeddingsConfig,
    *,
    device: torch.device,
    world_size: int,
    pg: dist.ProcessGroup | None = None,
) -> tuple[DistributedModelParallel, ShardingReport]:
    """Plan (collectively) and shard the sparse arch; initialise local shards from the arch's seed.

    Args:
        module: `build_sparse_arch(..., device=torch.device("meta"))` (only the sparse arch: keep the
            dense model out of DMP, see `parallel.layout`).
        features, emb: config sections (constraints, optimizer).
        device: this rank's compute device (from parallel.env's Runtime).
        world_size: ranks of `pg`.
        pg: process group (default: the world group).

    Returns:
        (dmp, report): `dmp(kjt)` gives the pooled KeyedTensor (key order depends on the plan);
        `dmp.fused_optimizer` holds the sparse optimizer, already applied inside backward.
    """
    if not isinstance(module, SparseArch):
        raise TypeError(f"shard_sparse_arch: expected the SparseArch of build_sparse_arch, got {type(module).__name__}")
    pg = pg if pg is not None else dist.GroupMember.WORLD
    if pg is None:
        raise RuntimeError("shard_sparse_arch: torch.distributed is not initialised")
    if pg.size() != world_size:
        raise ValueError(f"shard_sparse_arch: world_size={world_size} but the process group has {pg.size()} ranks")
    specs = module.specs
    module.set_mc_buckets(world_size)
    whole_world = world_size == dist.get_world_size()
    sharders = make_sharders(emb, device.type, whole_world)
    constraints = make_constraints(specs, features, emb, device.type, world_size, whole_world)
    topology = Topology(
        world_size=world_size,
        compute_device=device.type,
        local_world_size=get_local_size(world_size),
        hbm_cap=hbm_cap_bytes(emb, device),
    )
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(module, sharders, pg)
    dmp = DistributedModelParallel(
        module, env=ShardingEnv.from_process_group(pg), device=device, plan=plan, sharders=sharders
    )
    init_local_shards_(dmp, specs, module.init_seed)
    return dmp, ShardingReport.from_plan(plan, specs, emb.optimizer, world_size)


def set_sparse_lr(dmp: DistributedModelParallel, lr: float) -> None:
    """Set the fused sparse optimizer's learning rate (call every step from the schedule).

    FBGEMM reads `param_groups[i]["lr"]` only in the fused optimizer's `zero_grad`/`step`, which do
    nothing else for fused tables; `zero_grad` pushes the new rate into the kernels.
    """
    opt = dmp.fused_optimizer
    for group in opt.param_groups:
        group["lr"] = lr  # type: ignore[index]
    opt.zero_grad()
