"""Typed config section for the sparse side: sharding and the fused sparse optimizer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EmbeddingsConfig:
    """TorchRec embedding tables: sharding, optimizer, collision handling."""

    sharding: str = "auto"
    """Sharding type for every table: 'auto' (the planner chooses among the types that work on this
    device), 'table_wise', 'row_wise', 'column_wise', 'table_row_wise', 'table_column_wise', or
    'grid_shard' (CUDA only). 'data_parallel' is not offered: the fused optimizer would not update it."""
    table_sharding: dict[str, str] = field(default_factory=dict)
    """Per-table override of `sharding`, e.g. {item = "row_wise"}."""
    optimizer: str = "rowwise_adagrad"
    """Sparse optimizer fused into backward: 'rowwise_adagrad', 'adagrad', 'sgd', or 'adam' (CUDA only:
    FBGEMM's CPU kernels support the other three)."""
    lr: float = 0.05
    """Sparse learning rate (peak; follows the training schedule's shape)."""
    eps: float = 1e-8
    """Optimizer epsilon."""
    managed_collision: list[str] = field(default_factory=list)
    """Tables whose ids go through TorchRec's managed-collision module (zero-collision hashing with
    eviction); their features should use `id_mapping = "raw"`."""
    mc_eviction_interval: int = 1
    """Steps between managed-collision evictions."""
