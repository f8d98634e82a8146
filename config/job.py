"""The whole job: one typed tree of sections, and the rules that span sections.

Each section is defined and validated next to the code that implements it (`pipeline.config`,
`embeddings.config`, `model.config`, `metrics.config`, `config.training`, `config.parallelism`);
`validate_job` runs every section's own `validate()`, then the cross-section rules below, before
any process group starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from config.parallelism import ParallelismConfig
from config.training import TrainingConfig
from embeddings.config import EmbeddingsConfig
from metrics.config import MetricsConfig
from model.config import DenseInputSpec, ModelConfig, MoEConfig
from pipeline.config import DataConfig, FeaturesConfig
from schema import ConfigError


@dataclass
class JobConfig:
    """The whole job. Sections match the TOML tables."""

    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.training.output_dir or f"runs/{self.training.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def dense_input_spec(features: FeaturesConfig) -> DenseInputSpec:
    """The model's dense input shape from the [features] section (what is bucketized, flags, sizes)."""
    bucketized = tuple(i for i, n in enumerate(features.dense) if features.dense_transform_of(n) == "bucketize")
    return DenseInputSpec(
        num_features=len(features.dense),
        bucketized=bucketized,
        num_buckets=features.dense_buckets,
        bucket_dim=features.dense_bucket_dim,
        missing_flags=features.dense_missing_flags,
    )


def validate_job(cfg: JobConfig, world_size: int = 1) -> None:
    """Every section's own checks, then the rules that span sections. Raises ConfigError naming the key.
    One value is set here, as it needs the world size: data.batch_size from data.global_batch_size."""
    for section in (cfg.data, cfg.features, cfg.embeddings, cfg.model, cfg.training, cfg.parallelism, cfg.metrics):
        section.validate()
    m, moe, emb = cfg.model, cfg.moe, cfg.embeddings
    if moe.enabled:
        moe.validate()
        if not m.name.startswith("rankmixer"):
            raise ConfigError(f"moe.enabled needs a RankMixer model, not model.name = {m.name!r}")
        if m.ffn_activation != "gelu":
            raise ConfigError(
                f"model.ffn_activation = {m.ffn_activation!r} applies to the dense FFN; with moe.enabled the "
                "experts are GELU FFNs: set it to 'gelu' or moe.enabled = false"
            )
    if (gb := cfg.data.global_batch_size) > 0:
        if gb % world_size:
            raise ConfigError(
                f"config key 'data.global_batch_size' = {gb} must be a multiple of the world size ({world_size}): "
                "every rank reads global_batch_size / world size rows per step"
            )
        cfg.data.batch_size = gb // world_size
    ep = cfg.parallelism.ep_size
    if world_size % ep:
        raise ConfigError(f"parallelism.ep_size ({ep}) must divide the world size ({world_size})")
    if ep > 1:
        if not moe.enabled:
            raise ConfigError("parallelism.ep_size > 1 needs moe.enabled = true (there are no experts to shard)")
        if m.num_tokens % ep:
            raise ConfigError(f"parallelism.ep_size ({ep}) must divide model.num_tokens ({m.num_tokens})")
    has_valid = bool(cfg.data.valid) or cfg.data.valid_fraction > 0
    if cfg.training.early_stopping and not has_valid:
        raise ConfigError("training.early_stopping needs validation rows: set data.valid or data.valid_fraction")
    task = cfg.training.early_stopping_metric.rsplit("/", 1)[0] if "/" in cfg.training.early_stopping_metric else ""
    if task and task not in cfg.features.labels:
        raise ConfigError(f"training.early_stopping_metric names task {task!r}; tasks: {cfg.features.labels}")
    tokenized = m.name.startswith("rankmixer") or m.name == "self_attention"
    if tokenized and m.tokenization == "groups":
        groups = sum(any(f.group == g for f in cfg.features.sparse) for g in cfg.features.groups)
        groups += bool(cfg.features.dense) + (m.feature_dots > 0)
        if m.num_tokens < groups:
            raise ConfigError(
                f"model.tokenization = 'groups' gives every feature group its own tokens: model.num_tokens "
                f"({m.num_tokens}) must be >= the {groups} groups with features (features.groups, plus dense"
                f"{', plus the feature dot products' if m.feature_dots else ''})"
            )
    if tokenized and m.feature_dots > 0:
        if len(cfg.features.sparse) < 2:
            raise ConfigError(f"model.feature_dots = {m.feature_dots} needs at least two features.sparse to pair up")
        for i, sf in enumerate(cfg.features.sparse):
            if sf.dim != m.feature_dots:
                raise ConfigError(
                    f"model.feature_dots = {m.feature_dots} takes dot products of equal-width feature embeddings: "
                    f"features.sparse[{i}] ({sf.name!r}) has dim {sf.dim}"
                )
    if cfg.features.dense and cfg.model.dense_proj_dim < 1:
        raise ConfigError("model.dense_proj_dim must be >= 1 when there are dense features")
    managed = set(emb.managed_collision)
    for i, sf in enumerate(cfg.features.sparse):
        if sf.id_mapping == "raw" and sf.table_name not in managed:
            raise ConfigError(
                f"features.sparse[{i}] ({sf.name!r}): id_mapping = 'raw' passes ids unchanged, which only a "
                f"managed-collision table takes (embeddings.managed_collision); a plain table would send every id "
                f"outside [0, {sf.vocab_size}) to row 0. Use 'modulo' (ids in range kept, the others hashed in and "
                f"counted) or list table {sf.table_name!r} in embeddings.managed_collision"
            )
    tables = cfg.features.table_names()
    for key, names in (
        ("embeddings.table_sharding", list(emb.table_sharding)),
        ("embeddings.managed_collision", emb.managed_collision),
    ):
        for name in names:
            if name not in tables:
                raise ConfigError(f"{key} names unknown table {name!r}; tables: {sorted(tables)}")
