"""Embedding tables from the feature config, and the sparse arch that pools a KJT batch per feature.

    features.sparse  --table_specs-->  TableSpec (one per table; features sharing `table` share it)
                     --build_sparse_arch-->  SparseArch(ebc [, mc_ebc])   (TorchRec modules, DMP shards them)

Notable:
- Pooling is per table in TorchRec. A table whose features all pool the same way gets that pooling
  natively; a table shared by a scalar feature (SUM) and a list feature (MEAN), like the default
  config's `item`, is pooled with SUM and the MEAN features are divided by their lengths after the
  lookup (sum / max(len, 1) is exactly TorchRec's MEAN, empty bags included) so the rows stay shared.
- Weights are initialised from (seed, table, global row block), never from the shard layout: the same
  seed gives the same table whatever the plan, world size or device ("meta" included, see
  `init_local_shards_`).
- Tables named in `embeddings.managed_collision` go through TorchRec's managed-collision module
  (MCH, zero-collision hashing with eviction) in a separate `ManagedCollisionEmbeddingBagCollection`.
- A list feature with `pooling = "target_attention"` is looked up as O SUM-pooled position keys
  `<name>#j` of its table (`embeddings.attention.expand_sequences`, before the lookup) and pooled
  against its `target` feature afterwards (`finish_pooling`), so TorchRec sees only plain features.

Legend: B batch, I pooled-embedding width, S sparse features (KJT keys), R table rows, C one table's width.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embeddings.attention import TargetAttention, expand_sequences, pool_attention
from embeddings.config import EmbeddingsConfig
from pipeline.config import POOLINGS, FeaturesConfig

POOLING_TYPES = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN, "target_attention": PoolingType.SUM}
"""TorchRec's pooling for each name of `pipeline.config.POOLINGS` (the config validates against those);
'target_attention' features are looked up as SUM-pooled position keys and pooled after the lookup."""
assert tuple(POOLING_TYPES) == POOLINGS, "embeddings/tables.py: POOLING_TYPES must cover pipeline.config.POOLINGS"
INIT_BLOCK_ROWS = 8192
"""Rows per deterministic init block: each block has its own generator seeded by (seed, table, block)."""


@dataclass
class TableSpec:
    """One embedding table and the features that look it up.

    Args:
        name: table name (TorchRec `EmbeddingBagConfig.name`).
        num_embeddings: rows R.
        dim: width D.
        feature_names: features reading this table, in config order.
        pooling: TorchRec pooling of the table ('sum' or 'mean').
        mean_features: features pooled with SUM by TorchRec that must be divided by their lengths
            (only for tables shared by SUM and MEAN features).
        managed_collision: ids go through a managed-collision module first.
        attention: the features of `feature_names` pooled with 'target_attention' (TorchRec sees their
            position keys instead, see `lookup_features`).
    """

    name: str
    num_embeddings: int
    dim: int
    feature_names: list[str] = field(default_factory=list)
    pooling: str = "sum"
    mean_features: list[str] = field(default_factory=list)
    managed_collision: bool = False
    attention: list[TargetAttention] = field(default_factory=list)

    @property
    def lookup_features(self) -> list[str]:
        """TorchRec's feature names of this table: `feature_names` with each attention feature replaced by
        its position keys `<name>#0 .. <name>#{O-1}` (what `expand_sequences` makes of the batch)."""
        expanded = {a.feature: a.position_keys() for a in self.attention}
        return [k for n in self.feature_names for k in expanded.get(n, [n])]

    def config(self) -> EmbeddingBagConfig:
        """The TorchRec config of this table."""
        return EmbeddingBagConfig(
            name=self.name,
            embedding_dim=self.dim,
            num_embeddings=self.num_embeddings,
            feature_names=self.lookup_features,
            pooling=POOLING_TYPES[self.pooling],
        )


def table_specs(features: FeaturesConfig, emb: EmbeddingsConfig) -> list[TableSpec]:
    """Group `features.sparse` into tables (first-appearance order); errors name the offending key.

    Raises:
        ValueError: features sharing a table disagree on vocab_size/dim, a pooling is unknown,
            `embeddings.managed_collision` names an unknown table / a feature without id_mapping 'raw'
            or a table with a 'target_attention' feature, or an attention target is not a scalar feature
            of the same dim.
    """
    specs: dict[str, TableSpec] = {}
    poolings: dict[str, dict[str, str]] = {}
    for i, f in enumerate(features.sparse):
        key = f"features.sparse[{i}] (name '{f.name}')"
        if f.vocab_size <= 0 or f.dim <= 0:
            raise ValueError(f"{key}: vocab_size and dim must be positive, got {f.vocab_size} and {f.dim}")
        t = f.table_name
        spec = specs.get(t)
        if spec is None:
            spec = specs[t] = TableSpec(name=t, num_embeddings=f.vocab_size, dim=f.dim)
            poolings[t] = {}
        elif (spec.num_embeddings, spec.dim) != (f.vocab_size, f.dim):
            first = spec.feature_names[0]
            raise ValueError(
                f"{key}: table '{t}' has vocab_size={spec.num_embeddings}, dim={spec.dim} from feature "
                f"'{first}' but this feature says vocab_size={f.vocab_size}, dim={f.dim}"
            )
        spec.feature_names.append(f.name)
        # an attention feature's position keys are SUM lookups; its pooling happens after the lookup
        poolings[t][f.name] = "sum" if f.pooling_mode == "target_attention" else f.pooling_mode
        if f.pooling_mode == "target_attention":
            spec.attention.append(TargetAttention(f.name, f.target, f.max_len))
    mc = set(emb.managed_collision)
    for name in emb.managed_collision:
        if name not in specs:
            raise ValueError(f"embeddings.managed_collision: unknown table '{name}'; tables: {', '.join(specs)}")
    by_name = {f.name: f for f in features.sparse}
    for a in (a for spec in specs.values() for a in spec.attention):
        clash = [k for k in a.position_keys() if k in by_name]
        if clash:
            raise ValueError(f"feature '{clash[0]}': the name is a position key of attention feature '{a.feature}'")
        q, f = by_name.get(a.target), by_name[a.feature]
        if q is None or q.max_len != 1 or q.dim != f.dim or a.target == a.feature:
            raise ValueError(
                f"feature '{a.feature}': target = '{a.target}' "
                f"must name another scalar feature (max_len 1) of dim {f.dim}"
            )
    for t, spec in specs.items():
        modes = set(poolings[t].values())
        if len(modes) == 1:
            spec.pooling = modes.pop()
        else:
            spec.pooling = "sum"
            spec.mean_features = [n for n, m in poolings[t].items() if m == "mean"]
        if t in mc:
            spec.managed_collision = True
            if spec.attention:
                raise ValueError(
                    f"feature '{spec.attention[0].feature}': pooling = \"target_attention\" is not supported on "
                    f"managed-collision table '{t}' (embeddings.managed_collision)"
                )
            for n in spec.feature_names:
                if by_name[n].id_mapping != "raw":
                    raise ValueError(
                        f"feature '{n}': table '{t}' is in embeddings.managed_collision, so its ids must reach "
                        f'it unhashed (id_mapping = "raw"), got id_mapping = "{by_name[n].id_mapping}"'
                    )
    return list(specs.values())


def _block_seed(seed: int, table: str, block: int) -> int:
    """Stable 63-bit seed of one init block (no Python `hash`, which is salted per process)."""
    h = zlib.crc32(f"{seed}/{table}/{block}".encode())
    return (h * 0x9E3779B97F4A7C15 + seed) % (2**63 - 1)


@torch.no_grad()
def init_rows_(
    weight_RC: torch.Tensor, table: str, num_embeddings: int, row0: int, col0: int, dim: int, seed: int
) -> None:
    """Fill one shard of a table in place, plan-independently.

    Args:
        weight_RC: the local shard, R x C_shard (any float dtype / device).
        table: table name; num_embeddings / dim: full table shape.
        row0, col0: global offsets of the shard (row-wise / column-wise sharding).
        seed: init seed.

    Values are U(-sqrt(1/num_embeddings), +sqrt(1/num_embeddings)) like TorchRec's default, drawn per
    block of `INIT_BLOCK_ROWS` full-width rows, so any shard of the same table gets the same numbers.
    """
    rows, cols = weight_RC.shape
    if rows == 0 or cols == 0:
        return
    bound = math.sqrt(1.0 / num_embeddings)
    first, last = row0 // INIT_BLOCK_ROWS, (row0 + rows - 1) // INIT_BLOCK_ROWS
    for b in range(first, last + 1):
        b_start = b * INIT_BLOCK_ROWS
        b_rows = min(INIT_BLOCK_ROWS, num_embeddings - b_start)
        gen = torch.Generator().manual_seed(_block_seed(seed, table, b))
        block = torch.rand(b_rows, dim, generator=gen, dtype=torch.float32) * (2 * bound) - bound
        lo, hi = max(row0, b_start), min(row0 + rows, b_start + b_rows)
        weight_RC[lo - row0 : hi - row0].copy_(block[lo - b_start : hi - b_start, col0 : col0 + cols])


class SparseArch(nn.Module):
    """Pooled embeddings per feature from a KJT batch.

    Children: `ebc` (EmbeddingBagCollection of the plain tables, absent if every table is managed) and
    `mc_ebc` (ManagedCollisionEmbeddingBagCollection, only with `embeddings.managed_collision`). DMP
    shards the children; this module has no parameters of its own, so DMP wraps nothing in DDP.

    Input (keys = every name of features.sparse, any order; ids in [0, vocab) except managed tables):

        feature  | sample 0 | sample 1 | ...
        u0       | [17]     | [3]      |
        s_item   | [4, 9]   | []       |

    Output: KeyedTensor, one B x dim slice per feature (exactly the configured names: the position keys
    of 'target_attention' features never leave it). Its key order is NOT fixed (it depends on the
    sharding plan): read it by name, e.g. with `embeddings.regroup.pooled_to_model_input`.
    """

    def __init__(self, specs: list[TableSpec], device: torch.device, mc_eviction_interval: int = 1, seed: int = 0):
        super().__init__()
        self.specs = specs
        self.init_seed = seed
        plain = [s for s in specs if not s.managed_collision]
        managed = [s for s in specs if s.managed_collision]
        self.ebc_features = [n for s in plain for n in s.lookup_features]
        self.mc_features = [n for s in managed for n in s.lookup_features]
        self.mean_features = [n for s in specs for n in s.mean_features]
        self.attention = [a for s in specs for a in s.attention]
        self.ebc: EmbeddingBagCollection | None = None
        self.mc_ebc: ManagedCollisionEmbeddingBagCollection | None = None
        if plain:
            self.ebc = EmbeddingBagCollection(tables=[s.config() for s in plain], device=device)
        if managed:
            configs = [s.config() for s in managed]
            # The MC modules' buffers are small (R int64 ids per table) and must hold their real initial
            # values (sorted-id sentinels), so they never live on "meta"; DMP rebuilds them per shard.
            self._mc_device = torch.device("cpu") if device.type == "meta" else device
            self._mc_eviction_interval = mc_eviction_interval
            self.mc_ebc = ManagedCollisionEmbeddingBagCollection(
                EmbeddingBagCollection(tables=configs, device=device),
                ManagedCollisionCollection(managed_collision_modules=self._mc_modules(1), embedding_configs=configs),
                return_remapped_features=False,
            )
        if device.type != "meta":
            self.reset_parameters_from_seed()

    def _mc_modules(self, buckets: int) -> dict[str, nn.Module]:
        return {
            s.name: MCHManagedCollisionModule(
                zch_size=s.num_embeddings,
                device=self._mc_device,
                eviction_policy=DistanceLFU_EvictionPolicy(),
                eviction_interval=self._mc_eviction_interval,
                buckets=buckets,
            )
            for s in self.specs
            if s.managed_collision
        }

    def set_mc_buckets(self, buckets: int) -> None:
        """Fresh managed-collision modules with `buckets` id buckets (TorchRec's planner needs a multiple
        of the world size to shard them row-wise). Call before sharding; it drops their id mappings."""
        if self.mc_ebc is not None:
            mcc = self.mc_ebc._managed_collision_collection
            mcc._managed_collision_modules = nn.ModuleDict(self._mc_modules(buckets))

    @torch.no_grad()
    def reset_parameters_from_seed(self) -> None:
        """Deterministic init of every (unsharded) table from `init_seed`; see `init_rows_`."""
        for spec in self.specs:
            ebc = self.mc_ebc._embedding_module if spec.managed_collision else self.ebc  # type: ignore[union-attr]
            weight = ebc.embedding_bags[spec.name].weight  # type: ignore[union-attr, index]
            init_rows_(weight, spec.name, spec.num_embeddings, 0, 0, spec.dim, self.init_seed)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        """kjt (keys = feature names) -> KeyedTensor of B x dim per feature (plan-dependent key order)."""
        ids = expand_sequences(kjt, self.specs)  # `kjt` itself unless a feature is 'target_attention'
        outs: list[KeyedTensor] = []
        if self.mc_ebc is None:
            outs.append(self.ebc(ids))  # type: ignore[misc]
        else:
            keys = ids.keys()
            order = [keys.index(n) for n in self.ebc_features + self.mc_features]
            parts = ids.permute(order).split([len(self.ebc_features), len(self.mc_features)])
            if self.ebc is not None:
                outs.append(self.ebc(parts[0]))
            outs.append(self.mc_ebc(parts[1])[0])  # type: ignore[arg-type]
        if len(outs) == 1 and not self.mean_features and not self.attention:
            return outs[0]
        return finish_pooling(outs, kjt, self.mean_features, self.attention)


def finish_pooling(
    outs: list[KeyedTensor],
    kjt: KeyedJaggedTensor,
    mean_features: list[str],
    attention: list[TargetAttention] | None = None,
) -> KeyedTensor:
    """The lookup's post-processing: one KeyedTensor from several, `mean_features` divided by their
    per-sample lengths, then each attention feature's position slices pooled against its target.

    Args:
        outs: the lookups' KeyedTensors (any key order: everything is read by name).
        kjt: the ORIGINAL batch (before `expand_sequences`): its lengths divide the means and mask the
            attention.
        mean_features: features pooled with SUM by TorchRec that are MEAN features.
        attention: the 'target_attention' features (`embeddings.attention.pool_attention`).

    Returns:
        KeyedTensor of B x dim per configured feature (no `<name>#j` keys).
    """
    keys: list[str] = []
    tensors: list[torch.Tensor] = []
    for kt in outs:
        for k, t_BC in kt.to_dict().items():
            keys.append(k)
            tensors.append(t_BC)
    if mean_features:
        kjt_keys = kjt.keys()
        lengths_SB = kjt.lengths().view(len(kjt_keys), -1)
        for i, k in enumerate(keys):
            if k in mean_features:
                n_B = lengths_SB[kjt_keys.index(k)].clamp(min=1).to(tensors[i].dtype)
                tensors[i] = tensors[i] / n_B.unsqueeze(1)
    if attention:
        pooled = pool_attention(dict(zip(keys, tensors)), kjt, attention)
        keys, tensors = list(pooled), list(pooled.values())
    return KeyedTensor.from_tensor_list(keys, tensors)


def build_sparse_arch(
    features: FeaturesConfig, emb: EmbeddingsConfig, *, device: torch.device, seed: int = 0
) -> nn.Module:
    """The sparse arch (a `SparseArch`) for `features`, ready for `shard_sparse_arch`.

    Args:
        features: the features section (tables, dims, pooling).
        emb: the embeddings section (managed collision).
        device: "meta" when it will be sharded (DMP materialises only local shards and
            `shard_sparse_arch` initialises them from `seed`), else the device of an unsharded copy.
        seed: init seed (pass training.seed); the same seed gives the same tables sharded or not.

    Example:
        arch = build_sparse_arch(cfg.features, cfg.embeddings, device=torch.device("cpu"))
        x_BI = pooled_to_model_input(arch(batch.sparse), cfg.features)
    """
    if not features.sparse:
        raise ValueError("features.sparse is empty: the sparse arch needs at least one feature")
    return SparseArch(table_specs(features, emb), device, emb.mc_eviction_interval, seed)
