"""One typed config tree for a job, loaded from TOML with `--section.field value` overrides.

    cfg = load_config(["--config", "configs/tiny.toml", "--training.steps", "20"])

Unknown keys (in a file or on the command line) are errors naming the key and listing the valid
ones; invalid combinations are rejected here, before any process group starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from embeddings.config import EmbeddingsConfig
from model.config import MODEL_NAMES, ModelConfig, MoEConfig
from pipeline.config import DataConfig, FeaturesConfig, SparseFeature


class ConfigError(ValueError):
    """A config problem: names the key and what was expected."""


@dataclass
class TrainingConfig:
    """The training loop."""

    name: str = "default"
    """Run name; the default output_dir is runs/<name>."""
    output_dir: str = ""
    """Run directory (config.toml, metrics.jsonl, checkpoints/, summary.json); empty: runs/<name>."""
    steps: int = 0
    """Optimizer steps to run; 0 = run `epochs` full epochs."""
    epochs: int = 1
    """Epochs when steps = 0."""
    seed: int = 0
    """Seed for initialisation, shuffling and dropout."""
    optimizer: str = "rmsprop"
    """Dense optimizer: 'rmsprop' (the paper), 'adamw', 'adam', 'sgd'."""
    lr: float = 0.001
    """Peak dense learning rate."""
    weight_decay: float = 0.0
    """Dense weight decay."""
    warmup_steps: int = 20
    """Linear warmup steps for both the dense and the sparse learning rate."""
    lr_decay: str = "cosine"
    """Decay after warmup: 'cosine', 'linear' or 'none'."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = 1.0
    """Global gradient-norm clip of the dense parameters; 0 disables."""
    log_every: int = 10
    """Steps between log lines and metrics.jsonl rows."""
    eval_every: int = 0
    """Steps between evaluations; 0 = only at the end."""
    eval_batches: int = 0
    """Batches per rank per evaluation; 0 = the whole eval split."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 = only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are pruned."""
    resume: str = "auto"
    """'auto' (latest complete checkpoint in the run directory, if any), 'never', or a checkpoint path."""
    deterministic: bool = True
    """Deterministic algorithms (bit-exact resume on CPU)."""
    dtype: str = "fp32"
    """Compute dtype of the dense model: 'fp32' or 'bf16' (autocast; GPU)."""


@dataclass
class ParallelismConfig:
    """How the job is spread over processes."""

    ep_size: int = 1
    """Expert-parallel group size: each rank of a group owns num_tokens / ep_size token positions
    and all their experts. Must divide the world size and num_tokens."""


@dataclass
class MetricsConfig:
    """Metrics, tracking and plots."""

    wandb: bool = True
    """Log to Weights & Biases (rank 0 only; failures warn and never stop training)."""
    wandb_mode: str = "offline"
    """'offline', 'online' (default when WANDB_API_KEY is set) or 'disabled'."""
    wandb_project: str = "rankmixer"
    """W&B project."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 = per-device table on GPU, measured GEMM peak on CPU."""
    train_auc_window: int = 20
    """Steps in the windowed train AUC."""
    plots: bool = True
    """Write PNG plots into the run directory at the end."""
    progress: bool = True
    """Console progress bar on rank 0."""


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


# ---------------------------------------------------------------------------------------------
# building dataclasses from dicts


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a TOML value to the annotated type; raises ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a table, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a table, got {value!r}")
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if origin in (types.UnionType, typing.Union):
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown config key '{where}'; valid keys here: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_override_value(raw: str, tp: Any) -> Any:
    """Command-line strings become typed values: lists/tables as TOML literals."""
    origin = typing.get_origin(tp)
    if tp is str:
        return raw
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        return raw
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            return raw
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            return raw
    if origin in (list, dict):
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            if origin is list:
                return [p for p in raw.split(",") if p]
            return raw
    return raw


def _apply_override(tree: dict[str, Any], dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    cls: Any = JobConfig
    node = tree
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"unknown config key '{where}'; valid keys here: {', '.join(names)}")
        tp = _field_types(cls)[part]
        if i == len(parts) - 1:
            node[part] = _parse_override_value(raw, tp)
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is not a section")
        node = node.setdefault(part, {})
        cls = tp


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """['--a.b', '1', '--c.d=x'] -> [('a.b', '1'), ('c.d', 'x')]."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(items):
        tok = items[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument '{tok}'; overrides look like --section.field value")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ConfigError(f"override '--{key}' has no value")
            val = items[i + 1]
            i += 2
        out.append((key, val))
    return out


def load_config(argv: list[str] | None = None, world_size: int | None = None) -> JobConfig:
    """Parse `--config FILE` plus `--section.field value` overrides into a validated JobConfig."""
    parser = argparse.ArgumentParser(add_help=True, description="RankMixer job config")
    parser.add_argument("--config", default="", help="TOML file (configs/*.toml)")
    args, rest = parser.parse_known_args(argv if argv is not None else [])
    tree: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: invalid TOML: {e}") from None
    for key, val in parse_overrides(rest):
        _apply_override(tree, key, val)
    cfg = _build(JobConfig, tree, "")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size)
    return cfg


def _choice(value: str, allowed: tuple[str, ...] | list[str], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' = {value!r}; expected one of: {', '.join(allowed)}")


def validate(cfg: JobConfig, world_size: int = 1) -> None:
    """Reject invalid combinations before any process group starts."""
    m, moe, t, d, f = cfg.model, cfg.moe, cfg.training, cfg.data, cfg.features
    _choice(m.name, MODEL_NAMES, "model.name")
    _choice(m.mixing, ("paper", "article"), "model.mixing")
    _choice(moe.router, ("relu", "topk"), "moe.router")
    _choice(t.optimizer, ("rmsprop", "adamw", "adam", "sgd"), "training.optimizer")
    _choice(t.lr_decay, ("cosine", "linear", "none"), "training.lr_decay")
    _choice(t.dtype, ("fp32", "bf16"), "training.dtype")
    _choice(d.on_bad_file, ("error", "skip"), "data.on_bad_file")
    _choice(cfg.metrics.wandb_mode, ("offline", "online", "disabled"), "metrics.wandb_mode")
    # data_parallel is left out: TorchRec gives such tables the dense kernel and the fused optimizer
    # never updates them (see embeddings/sharding.py); grid_shard is CUDA-only (checked at sharding time).
    sharding_types = (
        "auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "grid_shard",
    )  # fmt: skip
    _choice(cfg.embeddings.sharding, sharding_types, "embeddings.sharding")
    _choice(cfg.embeddings.optimizer, ("rowwise_adagrad", "adagrad", "sgd", "adam"), "embeddings.optimizer")
    for pos in ("num_tokens", "d_model", "num_layers", "ffn_mult"):
        if getattr(m, pos) < 1:
            raise ConfigError(f"config key 'model.{pos}' must be >= 1, got {getattr(m, pos)}")
    if m.d_model % m.num_tokens != 0:
        raise ConfigError(
            f"model.d_model ({m.d_model}) must be divisible by model.num_tokens ({m.num_tokens}): "
            "token mixing splits every token into H = T heads"
        )
    if moe.enabled:
        if moe.num_experts < 1 or moe.expert_mult < 1:
            raise ConfigError("moe.num_experts and moe.expert_mult must be >= 1")
        if moe.router == "topk" and not 1 <= moe.top_k <= moe.num_experts:
            raise ConfigError(f"moe.top_k ({moe.top_k}) must be in [1, moe.num_experts={moe.num_experts}]")
        if not 0.0 < moe.target_activation <= 1.0:
            raise ConfigError(f"moe.target_activation must be in (0, 1], got {moe.target_activation}")
        if moe.l1_step <= 1.0:
            raise ConfigError(f"moe.l1_step must be > 1, got {moe.l1_step}")
        if not m.name.startswith("rankmixer"):
            raise ConfigError(f"moe.enabled needs a RankMixer model, not model.name = {m.name!r}")
    ep = cfg.parallelism.ep_size
    if ep < 1 or world_size % ep != 0:
        raise ConfigError(f"parallelism.ep_size ({ep}) must divide the world size ({world_size})")
    if ep > 1:
        if not moe.enabled:
            raise ConfigError("parallelism.ep_size > 1 needs moe.enabled = true (there are no experts to shard)")
        if m.num_tokens % ep != 0:
            raise ConfigError(f"parallelism.ep_size ({ep}) must divide model.num_tokens ({m.num_tokens})")
    if t.steps < 0 or t.epochs < 1:
        raise ConfigError("training.steps must be >= 0 and training.epochs >= 1")
    if d.batch_size < 1 or d.eval_batch_size < 1:
        raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
    for key in ("shuffle_window", "prefetch_row_groups"):
        if getattr(d, key) < 1:
            raise ConfigError(f"data.{key} must be >= 1, got {getattr(d, key)}")
    if m.attn_heads and m.d_model % m.attn_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.attn_heads ({m.attn_heads})")
    for key in ("tower_hidden", "mlp_hidden"):
        if any(w < 1 for w in getattr(m, key)):
            raise ConfigError(f"model.{key} widths must be >= 1, got {getattr(m, key)}")
    if m.cross_layers < 0:
        raise ConfigError(f"model.cross_layers must be >= 0, got {m.cross_layers}")
    if not f.labels:
        raise ConfigError("features.labels must name at least one label column (one per task)")
    if not f.sparse and not f.dense:
        raise ConfigError("features: no sparse or dense features configured")
    seen: set[str] = set()
    tables: dict[str, SparseFeature] = {}
    for i, sf in enumerate(f.sparse):
        key = f"features.sparse[{i}]"
        if not sf.name:
            raise ConfigError(f"{key}.name is empty")
        if sf.name in seen:
            raise ConfigError(f"{key}.name {sf.name!r} appears twice")
        seen.add(sf.name)
        if sf.group not in f.groups:
            raise ConfigError(f"{key}.group {sf.group!r} is not in features.groups {f.groups}")
        if sf.vocab_size < 1 or sf.dim < 1 or sf.max_len < 1:
            raise ConfigError(f"{key}: vocab_size, dim and max_len must be >= 1")
        _choice(sf.id_mapping, ("hash", "modulo", "raw"), f"{key}.id_mapping")
        _choice(sf.dtype, ("int64", "string"), f"{key}.dtype")
        if sf.pooling:
            _choice(sf.pooling, ("sum", "mean"), f"{key}.pooling")
        other = tables.get(sf.table_name)
        if other is not None and (other.vocab_size, other.dim) != (sf.vocab_size, sf.dim):
            raise ConfigError(
                f"{key}: table {sf.table_name!r} is shared with feature {other.name!r} but has a different "
                f"vocab_size/dim ({sf.vocab_size}/{sf.dim} vs {other.vocab_size}/{other.dim})"
            )
        tables.setdefault(sf.table_name, sf)
    for tname, st in cfg.embeddings.table_sharding.items():
        if tname not in tables:
            raise ConfigError(f"embeddings.table_sharding names unknown table {tname!r}; tables: {sorted(tables)}")
        _choice(st, sharding_types, f"embeddings.table_sharding.{tname}")
    for tname in cfg.embeddings.managed_collision:
        if tname not in tables:
            raise ConfigError(f"embeddings.managed_collision names unknown table {tname!r}; tables: {sorted(tables)}")
