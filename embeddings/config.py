"""Typed config section for the sparse side: sharding and the fused sparse optimizer.

The allowed names live here (no torchrec import, so `--help` is fast) and `embeddings.sharding`
dispatches on these same constants: every optimizer name maps to one FBGEMM type, every sharding type
is either planned or rejected there with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schema import check_one_of, check_range

SHARDING_TYPES = (
    "auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "grid_shard",
)  # fmt: skip
"""`embeddings.sharding` / `table_sharding` values. 'data_parallel' is left out: TorchRec gives such
tables the dense kernel and the fused optimizer never updates them; 'grid_shard' is CUDA-only
(checked when sharding, where the device is known)."""
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam")
"""`embeddings.optimizer`: FBGEMM's fused optimizers ('adam' is CUDA-only, checked when sharding)."""


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
    l2: float = 0.0
    """L2 penalty on the embeddings a batch looks up: l2 / 2 x the squared norm of each feature's pooled
    embedding (for a one-id feature, the looked-up row itself), averaged over the batch's rows and added
    to the loss (FuxiCTR's embedding_regularizer, counted per occurrence in the batch). It is a loss term,
    not the fused optimizer's weight_decay: FBGEMM's CPU kernels ignore weight_decay (checked: the same
    updates with and without it)."""
    vocab_l2: float = 0.0
    """The same L2 for features with id_mapping = 'vocab' (user / item ids: the rows that overfit first on
    click logs) unless a feature sets its own `l2`. 0 by default and in configs/recsys.toml: on both click
    logs' validation rows 1e-3 lost and 1e-4 / 1e-5 changed nothing (README, "Training on click logs")."""
    hbm_cap_gb: float = 0.0
    """GPU memory per device the sharding planner may fill, in GiB; 0 = the device's total memory
    (`torch.cuda.mem_get_info`), not TorchRec's fixed 32 GiB default. Tables that do not fit are placed
    with FBGEMM's UVM-caching kernel (rows in host memory, a cache in HBM). Ignored on CPU."""
    managed_collision: list[str] = field(default_factory=list)
    """Tables whose ids go through TorchRec's managed-collision module (zero-collision hashing with
    eviction); their features should use `id_mapping = "raw"`."""
    mc_eviction_interval: int = 1
    """Steps between managed-collision evictions."""

    def validate(self) -> None:
        """Names known, rates positive and finite (table names are checked against features by `config`)."""
        check_one_of(self.sharding, SHARDING_TYPES, "embeddings.sharding")
        for table, value in self.table_sharding.items():
            check_one_of(value, SHARDING_TYPES, f"embeddings.table_sharding.{table}")
        check_one_of(self.optimizer, SPARSE_OPTIMIZERS, "embeddings.optimizer")
        check_range(self.lr, "embeddings.lr", min=0.0, min_open=True)
        check_range(self.eps, "embeddings.eps", min=0.0, min_open=True)
        check_range(self.l2, "embeddings.l2", min=0.0)
        check_range(self.vocab_l2, "embeddings.vocab_l2", min=0.0)
        check_range(self.hbm_cap_gb, "embeddings.hbm_cap_gb", min=0.0)
        check_range(self.mc_eviction_interval, "embeddings.mc_eviction_interval", min=1)
