"""Test references for FLOPs and parameters: the paper's closed forms and torch's measured count.

Convention everywhere (the analytic `model.flops_per_sample()` of every zoo model included): forward
FLOPs of the matrix multiplications only, multiply-add = 2 FLOPs; bias adds, activations, LayerNorm
and token mixing (a copy) are
not counted; a training step = 3 x forward. The paper's "FLOPs per batch of 512" (233G for
RankMixer-100M, 455M per sample) is about twice our forward count (226M for the blocks at k = 3); the
paper does not state its convention, so we report ours as defined here and do not tune to theirs.

Legend: B batch, L layers, T tokens, D width, k FFN multiplier.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.config import ModelConfig


def paper_block_params(cfg: ModelConfig) -> int:
    """The paper's closed form for the dense blocks' parameters: 2 k L T D^2."""
    return 2 * cfg.ffn_mult * cfg.num_layers * cfg.num_tokens * cfg.d_model**2


def paper_block_flops(cfg: ModelConfig) -> int:
    """The paper's closed form for the dense blocks' forward FLOPs per sample: 4 k L T D^2."""
    return 4 * cfg.ffn_mult * cfg.num_layers * cfg.num_tokens * cfg.d_model**2


def block_params(model: nn.Module) -> int:
    """Parameters inside `model.blocks` (the RankMixer blocks), experts counted as stored."""
    return sum(p.numel() for p in model.blocks.parameters())


def measured_flops(fn: Callable[[], object]) -> int:
    """FLOPs torch's FlopCounterMode counts while running `fn()` (SDPA forced to the math kernel,
    whose matmuls the counter sees; the fused CPU kernel is invisible to it)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
