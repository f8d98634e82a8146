"""What every model of the zoo returns, and the multi-task loss.

Legend: B batch, K tasks, L layers, T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ModelOutput:
    """Output of a zoo model's forward pass.

    Attributes:
        logits_BK: B x K task logits (sigmoid gives the probabilities).
        reg_loss: scalar regularizer to add to the task loss (MoE L1 + load balance; 0 without MoE).
        stats: detached tensors for logging, e.g. "moe/active_LT" (L x T activation ratios).
    """

    logits_BK: torch.Tensor
    reg_loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def task_loss(
    logits_BK: torch.Tensor, labels_BK: torch.Tensor, weights_B: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over tasks of the (weighted) mean binary cross-entropy.

    Args:
        logits_BK: B x K logits.
        labels_BK: B x K labels in {0, 1}.
        weights_B: B row weights (0 for padding rows); None = all ones.

    Returns:
        (loss, per_task_K): the scalar loss and the K per-task mean losses (detached).
    """
    bce_BK = F.binary_cross_entropy_with_logits(logits_BK, labels_BK.to(logits_BK.dtype), reduction="none")
    if weights_B is None:
        per_task_K = bce_BK.mean(0)
    else:
        w_B1 = weights_B.to(bce_BK.dtype).unsqueeze(1)
        per_task_K = (bce_BK * w_B1).sum(0) / w_B1.sum().clamp_min(1.0)
    return per_task_K.sum(), per_task_K.detach()
