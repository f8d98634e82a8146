"""Feed-forward sub-layers of a RankMixer block: per-token FFN (the paper) and one shared FFN (ablation).

Per-token FFN: token t has its own weights, `v_t = W2_t GELU(W1_t s_t + b1_t) + b2_t` with
W1_t: D x kD, W2_t: kD x D. `model.ffn_activation = "geglu"` gates the hidden layer instead,
`v_t = W2_t (GELU(W1a_t s_t + b1a_t) * (W1b_t s_t + b1b_t)) + b2_t` (Shazeer 2020, "GLU Variants Improve
Transformer"; W1_t: D x 2kD holds both halves): after token mixing a token holds one head of every
feature group, so the product of its two projections multiplies features of different groups, the
explicit second-order term a cross layer has and a GELU unit can only approximate.

All T FFNs run as two batched matmuls (`baddbmm` over the token axis, bias fused) on token-major
activations: weights are stored T x in x out and activations T x B x width, so no transposed copy is
made anywhere in the forward or backward pass. Parameters grow T-fold against a
shared FFN; FLOPs stay the same.

Legend: B batch, T tokens, D width, M = k D hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import FFN_ACTIVATIONS
from model.init import uniform_param


def is_glu(activation: str) -> bool:
    """Whether `activation` (one of FFN_ACTIVATIONS) is the gated GEGLU; an unknown name is a ValueError
    (a typo must not silently build a GELU FFN)."""
    if activation not in FFN_ACTIVATIONS:
        raise ValueError(f"model/ffn.py: activation must be one of {FFN_ACTIVATIONS}, got {activation!r}")
    return activation == "geglu"


def activate(h_NW: Tensor, glu: bool) -> Tensor:
    """The FFN's hidden activation: GELU(h) (W = M), or GEGLU: GELU(h[..., :M]) * h[..., M:] (W = 2M).

    Args:
        h_NW: ... x W first-GEMM output (any leading shape).
        glu: gated (GEGLU) instead of plain GELU.

    Returns:
        ... x M hidden activations.
    """
    if not glu:
        return F.gelu(h_NW)
    a_NM, g_NM = h_NW.chunk(2, dim=-1)
    return F.gelu(a_NM) * g_NM


class PerTokenFFN(nn.Module):
    """T independent FFNs D -> kD -> D (GELU or GEGLU), one batched matmul per layer.

    Args:
        num_tokens: T.
        d_model: D.
        mult: k.
        gen: generator for the initialisation (nn.Linear's default bounds).
        dropout: dropout on the hidden activations (model.dropout).
        activation: "gelu" (the paper) or "geglu" (W1 is D x 2kD: value and gate halves; 1.5x the
            parameters and FLOPs).

    Example:
        >>> ffn = PerTokenFFN(4, 8, 2, torch.Generator().manual_seed(0))
        >>> ffn(torch.randn(4, 3, 8)).shape  # T x B x D
        torch.Size([4, 3, 8])
    """

    def __init__(
        self,
        num_tokens: int,
        d_model: int,
        mult: int,
        gen: torch.Generator,
        dropout: float = 0.0,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        T, D, M = num_tokens, d_model, mult * d_model
        self.num_tokens, self.d_model, self.mult = T, D, mult
        self.glu = is_glu(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        W = 2 * M if self.glu else M  # GEGLU: value and gate columns side by side
        self.w1 = uniform_param((T, D, W), D, gen)  # T x D x W (in x out, token-major)
        self.b1 = uniform_param((T, 1, W), D, gen)
        self.w2 = uniform_param((T, M, D), M, gen)
        self.b2 = uniform_param((T, 1, D), M, gen)

    def forward(self, s_TBD: Tensor) -> Tensor:
        """s_TBD: T x B x D -> v_TBD: T x B x D."""
        h_TBM = activate(torch.baddbmm(self.b1, s_TBD, self.w1), self.glu)
        return torch.baddbmm(self.b2, self.dropout(h_TBM), self.w2)

    def flops_per_sample(self) -> float:
        """4 k T D^2 (two GEMMs, multiply-add = 2); 6 k T D^2 with GEGLU (the first GEMM is twice as wide)."""
        return (6.0 if self.glu else 4.0) * self.mult * self.num_tokens * self.d_model**2


class SharedFFN(nn.Module):
    """One FFN D -> kD -> D shared by all tokens (the shared-FFN ablation).

    Args:
        num_tokens: T (only for the FLOPs count).
        d_model: D.
        mult: k.
        gen: generator for the initialisation.
        dropout: dropout on the hidden activations.
        activation: "gelu" or "geglu", as in PerTokenFFN.
    """

    def __init__(
        self,
        num_tokens: int,
        d_model: int,
        mult: int,
        gen: torch.Generator,
        dropout: float = 0.0,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        D, M = d_model, mult * d_model
        self.num_tokens, self.d_model, self.mult = num_tokens, D, mult
        self.glu = is_glu(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        W = 2 * M if self.glu else M
        self.w1 = uniform_param((D, W), D, gen)
        self.b1 = uniform_param((W,), D, gen)
        self.w2 = uniform_param((M, D), M, gen)
        self.b2 = uniform_param((D,), M, gen)

    def forward(self, s_TBD: Tensor) -> Tensor:
        """s_TBD: T x B x D -> v_TBD: T x B x D (one GEMM over all T x B rows per layer)."""
        T, B, D = s_TBD.shape
        h_NM = self.dropout(activate(torch.addmm(self.b1, s_TBD.reshape(T * B, D), self.w1), self.glu))
        return torch.addmm(self.b2, h_NM, self.w2).view(T, B, D)

    def flops_per_sample(self) -> float:
        """4 k T D^2 (6 k T D^2 with GEGLU), the same as the per-token FFN."""
        return (6.0 if self.glu else 4.0) * self.mult * self.num_tokens * self.d_model**2
