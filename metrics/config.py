"""Typed config section for metrics, tracking and plots (`[metrics]`); no torch import."""

from __future__ import annotations

from dataclasses import dataclass, field

from schema import check_one_of, check_range

WANDB_MODES = ("offline", "online", "disabled")
EVAL_AUC_MODES = ("histogram", "exact")
"""`metrics.eval_auc` (`metrics.streaming.eval_accumulator` dispatches on these)."""
"""`metrics.wandb_mode` (`metrics.tracking.resolve_wandb_mode` decides on these)."""


@dataclass
class MetricsConfig:
    """Metrics, tracking and plots."""

    wandb: bool = True
    """Log to Weights & Biases (rank 0 only; failures warn and never stop training)."""
    wandb_mode: str = "offline"
    """'offline', 'online' (default when WANDB_API_KEY is set) or 'disabled'."""
    wandb_project: str = "rankmixer"
    """W&B project."""
    wandb_group: str = ""
    """W&B group (runs compared together, e.g. a study's runs); empty = none."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B tags, e.g. ["baseline", "moe"]."""
    wandb_notes: str = ""
    """W&B notes: a sentence on what the run tries."""
    wandb_job_type: str = "train"
    """W&B job type ('train' for training runs; the study uses it too)."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 = per-device table on GPU, measured GEMM peak on CPU."""
    eval_auc: str = "histogram"
    """Evaluation metrics: 'histogram' (memory per rank independent of the eval set: AUC from score
    histograms with its error bound reported as auc_bound, UAUC on the users' owner ranks; see
    metrics/streaming.py) or 'exact' (every row all-gathered to every rank: small eval sets only)."""
    eval_auc_bins: int = 2**18
    """Bins of the 'histogram' AUC grid over the logit (8 MiB per task at the default)."""
    train_auc_window: int = 20
    """Steps in the windowed train AUC."""
    plots: bool = True
    """Write PNG plots into the run directory at the end."""
    progress: bool = True
    """Console progress bar on rank 0."""

    def validate(self) -> None:
        """Mode known, peak and window in range."""
        check_one_of(self.wandb_mode, WANDB_MODES, "metrics.wandb_mode")
        check_range(self.peak_flops, "metrics.peak_flops", min=0.0)
        check_range(self.train_auc_window, "metrics.train_auc_window", min=1)
        check_one_of(self.eval_auc, EVAL_AUC_MODES, "metrics.eval_auc")
        check_range(self.eval_auc_bins, "metrics.eval_auc_bins", min=2)
