"""Typed config section of the training loop (`[training]`): schedule, optimizer, cadence, resume.

The names allowed here are the ones the trainer implements: `parallel.dense_engine` builds exactly
DENSE_OPTIMIZERS, `train.schedule` exactly LR_DECAYS, the trainer exactly DTYPES.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from schema import ConfigError, check_one_of, check_range

DENSE_OPTIMIZERS = ("rmsprop", "adamw", "adam", "sgd")
"""`training.optimizer`."""
LR_DECAYS = ("cosine", "linear", "none")
"""`training.lr_decay`."""
DTYPES = ("fp32", "bf16")
"""`training.dtype`."""
RESUME_MODES = ("auto", "never")
"""`training.resume` keywords (anything else is a checkpoint path)."""
VALID_METRICS = {"auc": "max", "uauc": "max", "logloss": "min", "ne": "min"}
"""Validation metrics early stopping can follow, and which way is better."""


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
    ema_decay: float = 0.0
    """Exponential moving average of the dense model's weights (`train.ema`), in [0, 1); 0 = off. With it,
    validation, data.eval, the checkpoints' weights (best included) and so evaluate / export / predict use
    the averaged weights; training continues on its own. Bias-corrected like Adam's moments (the initial
    weights never enter it). The embedding tables are not averaged."""
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
    pipeline: bool = True
    """Overlap input with compute: batch i+1 is copied to the device (a side stream on CUDA) and its
    embedding input all-to-all started while step i computes (`train/pipeline.py`; the same losses as
    the plain loop). Off: one batch at a time."""
    deterministic: bool = True
    """Deterministic algorithms (bit-exact resume on CPU)."""
    dtype: str = "fp32"
    """Compute dtype of the dense model: 'fp32' or 'bf16' (autocast; GPU)."""
    early_stopping: bool = False
    """Stop when the validation metric has not improved for early_stopping_patience evaluations (needs
    data.valid or data.valid_fraction)."""
    early_stopping_metric: str = "auc"
    """Validation metric that picks the best checkpoint and drives early stopping: 'auc', 'uauc', 'logloss'
    or 'ne' averaged over the tasks, or '<task>/<metric>' for one task."""
    early_stopping_patience: int = 2
    """Evaluations without improvement before training stops."""
    early_stopping_min_delta: float = 0.0
    """Smallest change of the metric that counts as an improvement."""
    restore_best: bool = True
    """With validation data, end with the weights of the best validation evaluation (kept in
    checkpoints/best, apart from keep_last pruning) and score data.eval with them."""

    def validate(self) -> None:
        """Names known; every count, rate and cadence in range and finite."""
        check_one_of(self.optimizer, DENSE_OPTIMIZERS, "training.optimizer")
        check_one_of(self.lr_decay, LR_DECAYS, "training.lr_decay")
        check_one_of(self.dtype, DTYPES, "training.dtype")
        check_range(self.steps, "training.steps", min=0)
        check_range(self.epochs, "training.epochs", min=1)
        check_range(self.lr, "training.lr", min=0.0, min_open=True)
        check_range(self.weight_decay, "training.weight_decay", min=0.0)
        check_range(self.min_lr_ratio, "training.min_lr_ratio", min=0.0, max=1.0)
        check_range(self.grad_clip, "training.grad_clip", min=0.0)
        check_range(self.ema_decay, "training.ema_decay", min=0.0, max=1.0, max_open=True)
        check_range(self.log_every, "training.log_every", min=1)
        check_range(self.keep_last, "training.keep_last", min=1)
        for name in ("warmup_steps", "eval_every", "eval_batches", "checkpoint_every"):
            check_range(getattr(self, name), f"training.{name}", min=0)
        metric = self.early_stopping_metric.rsplit("/", 1)[-1]
        check_one_of(metric, VALID_METRICS, "training.early_stopping_metric (its metric part)")
        check_range(self.early_stopping_patience, "training.early_stopping_patience", min=1)
        check_range(self.early_stopping_min_delta, "training.early_stopping_min_delta", min=0.0)
        if self.resume not in RESUME_MODES and not Path(self.resume).is_dir():
            raise ConfigError(
                f"config key 'training.resume' = {self.resume!r}; expected {' or '.join(RESUME_MODES)} or the path of "
                "an existing checkpoint directory"
            )
