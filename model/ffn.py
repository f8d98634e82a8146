"""Feed-forward sub-layers of a RankMixer block: per-token FFN (the paper) and one shared FFN (ablation).

Per-token FFN: token t has its own weights, `v_t = W2_t GELU(W1_t s_t + b1_t) + b2_t` with
W1_t: D x kD, W2_t: kD x D. All T FFNs run as two batched matmuls (`baddbmm` over the token axis, bias
fused) on token-major activations: weights are stored T x in x out and activations T x B x width, so
no transposed copy is made anywhere in the forward or backward pass. Parameters grow T-fold against a
shared FFN; FLOPs stay the same.

Legend: B batch, T tokens, D width, M = k D hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.init import uniform_param


class PerTokenFFN(nn.Module):
    """T independent FFNs D -> kD -> D (GELU), one batched matmul per layer.

    Args:
        num_tokens: T.
        d_model: D.
        mult: k.
        gen: generator for the initialisation (nn.Linear's default bounds).
        dropout: dropout on the hidden activations (model.dropout).

    Example:
        >>> ffn = PerTokenFFN(4, 8, 2, torch.Generator().manual_seed(0))
        >>> ffn(torch.randn(4, 3, 8)).shape  # T x B x D
        torch.Size([4, 3, 8])
    """

    def __init__(self, num_tokens: int, d_model: int, mult: int, gen: torch.Generator, dropout: float = 0.0) -> None:
        super().__init__()
        T, D, M = num_tokens, d_model, mult * d_model
        self.num_tokens, self.d_model, self.mult = T, D, mult
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.w1 = uniform_param((T, D, M), D, gen)  # T x D x M (in x out, token-major)
        self.b1 = uniform_param((T, 1, M), D, gen)
        self.w2 = uniform_param((T, M, D), M, gen)
        self.b2 = uniform_param((T, 1, D), M, gen)

    def forward(self, s_TBD: Tensor) -> Tensor:
        """s_TBD: T x B x D -> v_TBD: T x B x D."""
        h_TBM = self.dropout(F.gelu(torch.baddbmm(self.b1, s_TBD, self.w1)))
        return torch.baddbmm(self.b2, h_TBM, self.w2)

    def flops_per_sample(self) -> float:
        """4 k T D^2 (two GEMMs, multiply-add = 2)."""
        return 4.0 * self.mult * self.num_tokens * self.d_model**2


class SharedFFN(nn.Module):
    """One FFN D -> kD -> D shared by all tokens (the shared-FFN ablation).

    Args:
        num_tokens: T (only for the FLOPs count).
        d_model: D.
        mult: k.
        gen: generator for the initialisation.
    """

    def __init__(self, num_tokens: int, d_model: int, mult: int, gen: torch.Generator, dropout: float = 0.0) -> None:
        super().__init__()
        D, M = d_model, mult * d_model
        self.num_tokens, self.d_model, self.mult = num_tokens, D, mult
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.w1 = uniform_param((D, M), D, gen)
        self.b1 = uniform_param((M,), D, gen)
        self.w2 = uniform_param((M, D), M, gen)
        self.b2 = uniform_param((D,), M, gen)

    def forward(self, s_TBD: Tensor) -> Tensor:
        """s_TBD: T x B x D -> v_TBD: T x B x D (one GEMM over all T x B rows per layer)."""
        T, B, D = s_TBD.shape
        h_NM = self.dropout(F.gelu(torch.addmm(self.b1, s_TBD.reshape(T * B, D), self.w1)))
        return torch.addmm(self.b2, h_NM, self.w2).view(T, B, D)

    def flops_per_sample(self) -> float:
        """4 k T D^2, the same as the per-token FFN."""
        return 4.0 * self.mult * self.num_tokens * self.d_model**2
