"""Sparse side: TorchRec embedding tables, sharding, regrouping into the model input, checkpoints.

arch = build_sparse_arch(cfg.features, cfg.embeddings, device=torch.device("meta"), seed=cfg.training.seed)
dmp, report = shard_sparse_arch(arch, cfg.features, cfg.embeddings, device=rt.device, world_size=ws)
x_BE = pooled_to_model_input(dmp(batch.sparse), cfg.features)     # B x sparse_dim(cfg.features)
"""

from embeddings.checkpoint import load_sparse, save_sparse, sparse_state_dict
from embeddings.regroup import feature_order, group_dims, pooled_to_model_input, sparse_dim
from embeddings.sharding import (
    ShardingReport,
    allowed_sharding_types,
    set_sparse_lr,
    shard_sparse_arch,
)
from embeddings.tables import SparseArch, TableSpec, build_sparse_arch, table_specs

__all__ = [
    "ShardingReport",
    "SparseArch",
    "TableSpec",
    "allowed_sharding_types",
    "build_sparse_arch",
    "feature_order",
    "group_dims",
    "load_sparse",
    "pooled_to_model_input",
    "save_sparse",
    "set_sparse_lr",
    "shard_sparse_arch",
    "sparse_dim",
    "sparse_state_dict",
    "table_specs",
]
