"""Token mixers of a RankMixer block: the paper's parameter-free multi-head token mixing, the seed
article's parameterised variant, and the multi-head self-attention of the ablation.

All mixers work on token-major tensors (T x B x D storage), the layout the per-token FFN wants, and
expose `mix_residual(x) = Mix(x) + x`, which the paper's mixing computes in one pass.

Paper mixing (H = T heads of width D/H): output token h is the concatenation of head h of every
input token. In the paper's B x T x D notation `reshape(B,T,H,D/H) -> transpose(T,H) -> reshape(B,H,T*D/H)`;
in token-major storage the same map is one permute + copy. With H = T it is its own inverse.

Article mixing (**ours**, our reading of the seed article): after the same regrouping, each mixed token
h goes through its own Linear(D, D) + GELU (batched over heads), then one output projection
Linear(D, D) shared by all tokens.

Group position encodings (`model.group_pos_emb`, **ours**, our reading of the article): after regrouping,
mixed token h is a group of T segments (segment t came from input token t). A learnable inter-group
embedding (one D-vector per group h) and an intra-group embedding (one D/H-vector per segment position t,
shared by all groups) are added to the regrouped tokens.

Legend: B batch, T tokens, H heads (= T), D width, c = D / H head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.init import uniform_param


def check_heads(d_model: int, num_heads: int, key: str = "model.num_tokens") -> None:
    """Raise a ValueError naming the config keys when D is not divisible by the head count."""
    if num_heads < 1 or d_model % num_heads != 0:
        raise ValueError(
            f"model.d_model ({d_model}) must be divisible by {key} ({num_heads}): "
            "token mixing splits every token into H heads of width D / H"
        )


def token_mixing_TBD(x_TBD: Tensor, num_heads: int) -> Tensor:
    """Parameter-free multi-head token mixing.

    Args:
        x_TBD: T x B x D tokens (any strides).
        num_heads: H; D must be divisible by H. With H = T the output has T tokens again.

    Returns:
        T' x B x (T*D/H) contiguous with T' = H: out[h, b, t*c:(t+1)*c] = x[t, b, h*c:(h+1)*c].
    """
    T, B, D = x_TBD.shape
    c = D // num_heads
    x_TBHc = x_TBD.reshape(T, B, num_heads, c)
    return x_TBHc.permute(2, 1, 0, 3).reshape(num_heads, B, T * c)


class TokenMixing(nn.Module):
    """The paper's mixing (H = T, no parameters), optionally with the article's group position encodings.

    Args:
        num_tokens: T (= H).
        d_model: D, divisible by T.
        group_pos_emb: add learnable inter-group (T x D) and intra-group (T x D/T) encodings.
    """

    def __init__(self, num_tokens: int, d_model: int, group_pos_emb: bool = False) -> None:
        super().__init__()
        check_heads(d_model, num_tokens)
        self.num_tokens = num_tokens
        if group_pos_emb:
            self.inter_HD = nn.Parameter(torch.zeros(num_tokens, d_model))
            self.intra_Tc = nn.Parameter(torch.zeros(num_tokens, d_model // num_tokens))
        else:
            self.inter_HD = self.intra_Tc = None

    def regroup(self, x_TBD: Tensor) -> Tensor:
        """Mix and add the group position encodings if enabled. x_TBD: T x B x D -> T x B x D."""
        y_TBD = token_mixing_TBD(x_TBD, self.num_tokens)
        if self.inter_HD is not None:
            pos_HD = self.inter_HD + self.intra_Tc.reshape(1, -1)  # segment t of every group gets intra_Tc[t]
            y_TBD = y_TBD + pos_HD.unsqueeze(1)
        return y_TBD

    def forward(self, x_TBD: Tensor) -> Tensor:
        """x_TBD: T x B x D -> T x B x D."""
        return self.regroup(x_TBD)

    def mix_residual(self, x_TBD: Tensor) -> Tensor:
        """Mix(X) + X in one pass: the residual is added straight from the permuted view (no mixed copy).

        Args:
            x_TBD: T x B x D tokens.

        Returns:
            T x B x D contiguous, equal to `self(x_TBD) + x_TBD`.
        """
        T, B, D = x_TBD.shape
        c = D // T
        mixed_HBTc = x_TBD.reshape(T, B, T, c).permute(2, 1, 0, 3)  # view: [h, b, t] = x[t, b, h-th head]
        y_TBD = (x_TBD.reshape(T, B, T, c) + mixed_HBTc).view(T, B, D)
        if self.inter_HD is not None:
            y_TBD = y_TBD + (self.inter_HD + self.intra_Tc.reshape(1, -1)).unsqueeze(1)
        return y_TBD

    def flops_per_sample(self) -> float:
        """No matmuls."""
        return 0.0


class ArticleMixing(TokenMixing):
    """The seed article's mixing: regroup, per-head Linear(D, D) + GELU, then a shared Linear(D, D).

    Args:
        num_tokens: T (= H).
        d_model: D, divisible by T.
        group_pos_emb: see `TokenMixing`.
        gen: generator for the initialisation.
    """

    def __init__(self, num_tokens: int, d_model: int, group_pos_emb: bool, gen: torch.Generator) -> None:
        super().__init__(num_tokens, d_model, group_pos_emb)
        D = d_model
        self.head_w = uniform_param((num_tokens, D, D), D, gen)
        self.head_b = uniform_param((num_tokens, 1, D), D, gen)
        self.out_w = uniform_param((D, D), D, gen)
        self.out_b = uniform_param((D,), D, gen)

    def forward(self, x_TBD: Tensor) -> Tensor:
        """x_TBD: T x B x D -> T x B x D."""
        T, B, D = x_TBD.shape
        h_TBD = F.gelu(torch.baddbmm(self.head_b, self.regroup(x_TBD), self.head_w))
        return torch.addmm(self.out_b, h_TBD.view(T * B, D), self.out_w).view(T, B, D)

    def mix_residual(self, x_TBD: Tensor) -> Tensor:
        """Mix(X) + X (T x B x D)."""
        return self(x_TBD) + x_TBD

    def flops_per_sample(self) -> float:
        """Per-head linear (2 T D^2) and output projection (2 T D^2)."""
        T, D = self.num_tokens, self.out_w.shape[0]
        return 4.0 * T * D * D


class IdentityMixing(nn.Module):
    """The no-mixing ablation: Mix(X) = X, so the first sub-layer is LN(X + X)."""

    def forward(self, x_TBD: Tensor) -> Tensor:
        """x_TBD: T x B x D -> the same tensor."""
        return x_TBD

    def mix_residual(self, x_TBD: Tensor) -> Tensor:
        """Mix(X) + X = 2 X (T x B x D)."""
        return x_TBD + x_TBD

    def flops_per_sample(self) -> float:
        return 0.0


class SelfAttention(nn.Module):
    """Multi-head self-attention over the T tokens (the ablation replacing token mixing).

    Fused QKV projection (one GEMM over all T x B rows), `F.scaled_dot_product_attention`, output
    projection. No mask, no dropout.

    Args:
        num_tokens: T.
        d_model: D.
        num_heads: heads (0 = T); D must be divisible by it.
        gen: generator for the initialisation.
    """

    def __init__(self, num_tokens: int, d_model: int, num_heads: int, gen: torch.Generator) -> None:
        super().__init__()
        heads = num_heads or num_tokens
        check_heads(d_model, heads, "model.attn_heads")
        self.num_tokens, self.num_heads = num_tokens, heads
        D = d_model
        self.qkv_w = uniform_param((D, 3 * D), D, gen)
        self.qkv_b = uniform_param((3 * D,), D, gen)
        self.out_w = uniform_param((D, D), D, gen)
        self.out_b = uniform_param((D,), D, gen)

    def forward(self, x_TBD: Tensor) -> Tensor:
        """x_TBD: T x B x D -> T x B x D."""
        T, B, D = x_TBD.shape
        H = self.num_heads
        qkv_TB3Hc = torch.addmm(self.qkv_b, x_TBD.reshape(T * B, D), self.qkv_w).view(T, B, 3, H, D // H)
        q_BHTc, k_BHTc, v_BHTc = qkv_TB3Hc.permute(2, 1, 3, 0, 4).unbind(0)
        o_BHTc = F.scaled_dot_product_attention(q_BHTc, k_BHTc, v_BHTc)
        o_TBD = o_BHTc.permute(2, 0, 1, 3).reshape(T * B, D)
        return torch.addmm(self.out_b, o_TBD, self.out_w).view(T, B, D)

    def mix_residual(self, x_TBD: Tensor) -> Tensor:
        """Attn(X) + X (T x B x D)."""
        return self(x_TBD) + x_TBD

    def flops_per_sample(self) -> float:
        """QKV (6 T D^2), scores and weighted values (4 T^2 D), output projection (2 T D^2)."""
        T, D = self.num_tokens, self.out_w.shape[0]
        return 8.0 * T * D * D + 4.0 * T * T * D
