"""FLOPs and parameters: the paper's closed forms, a measured count, the GEMM peak and MFU.

Convention everywhere (the analytic `model.flops_per_sample()` of every zoo model included): forward
FLOPs of the matrix multiplications only, multiply-add = 2 FLOPs; bias adds, activations, LayerNorm
and token mixing (a copy) are
not counted; a training step = 3 x forward. The paper's "FLOPs per batch of 512" (233G for
RankMixer-100M, 455M per sample) is about twice our forward count (226M for the blocks at k = 3); the
paper does not state its convention, so we report ours as defined here and do not tune to theirs.

Legend: B batch, L layers, T tokens, D width, k FFN multiplier.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
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


def gemm_peak_flops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matmul on CPU at the current thread count."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def mfu(flops_per_sample: float, samples_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the hardware peak (same dtype)."""
    return flops_per_sample * samples_per_s / peak_flops
