"""Learning-rate schedule shared by the dense optimizer and the fused sparse optimizer."""

from __future__ import annotations

import math

from config.training import LR_DECAYS


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warmup over `warmup_steps`, then 'cosine', 'linear' or 'none' decay to `min_ratio` at
    `total_steps`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "none" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if decay == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"training.lr_decay = {decay!r}; expected one of {', '.join(LR_DECAYS)}")
