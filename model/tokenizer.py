"""Tokenization: the grouped embedding vector of a sample -> T tokens of width D.

    sparse_BI (pooled embeddings, group order) --------------------------+
                                                                         +-- cat -> e_BZ -> zero-pad to T*d
    dense_BF -> DenseInput (transforms, projection, bucket embeddings) --+   -> T slices of width d
                                                                              slice t -> Proj_t -> x_t (width D)

The dense features join as a final 'dense' group (`model.dense_input`: standardized values projected
to `model.dense_proj_dim`, then the bucket embeddings of bucketized features). Projections are per
token by default (one batched matmul over the token axis), one shared projection as an option; an
optional learnable token position embedding is added last. The tokens are computed token-major
(T x B x D storage) because every later per-token matmul wants that layout; `forward` returns the
B x T x D *view* of it, which costs nothing, and `forward_TBD` the token-major tensor itself.

Initialisation draws from a local `torch.Generator` only (see `model.init`).

Legend: B batch, I pooled-embedding width, F dense features, Z = I + dense input width, T tokens,
d = ceil(Z / T) slice width, D token width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.config import DenseInputSpec, ModelConfig
from model.dense_input import DenseInput
from model.init import uniform_param


class Tokenizer(nn.Module):
    """sparse_BI (B x I) + dense_BF (B x F) -> x_BTD (B x T x D).

    Args:
        sparse_dim: I, width of the pooled embeddings concatenated in semantic-group order.
        dense: the dense input's shape (F features, bucketized ones, missing flags); F = 0: no dense group.
        cfg: the `model` config (num_tokens, d_model, dense_proj_dim, shared_projection, token_pos_emb).
        gen: generator for the initialisation (default: a fresh one seeded with 0).

    Example:
        >>> tok = Tokenizer(40, DenseInputSpec(3), ModelConfig(num_tokens=4, d_model=8, dense_proj_dim=4))
        >>> tok(torch.randn(2, 40), torch.randn(2, 3)).shape
        torch.Size([2, 4, 8])
    """

    def __init__(
        self, sparse_dim: int, dense: DenseInputSpec, cfg: ModelConfig, gen: torch.Generator | None = None
    ) -> None:
        super().__init__()
        num_dense = dense.num_features
        if sparse_dim < 0 or num_dense < 0 or sparse_dim + num_dense == 0:
            raise ValueError(
                f"model/tokenizer.py: need sparse_dim >= 0, dense features >= 0 and at least one input, "
                f"got sparse_dim={sparse_dim}, dense features={num_dense}"
            )
        if num_dense > 0 and cfg.dense_proj_dim < 1:
            raise ValueError(f"model/tokenizer.py: model.dense_proj_dim must be >= 1, got {cfg.dense_proj_dim}")
        gen = gen if gen is not None else torch.Generator().manual_seed(0)
        T, D = cfg.num_tokens, cfg.d_model
        self.sparse_dim, self.num_dense, self.num_tokens, self.d_model = sparse_dim, num_dense, T, D
        self.dense_input = DenseInput(dense, cfg.dense_proj_dim, gen) if num_dense > 0 else None
        self.dense_width = self.dense_input.out_width if self.dense_input is not None else 0
        self.in_width = sparse_dim + self.dense_width  # Z
        self.slice_width = math.ceil(self.in_width / T)  # d
        self.shared = cfg.shared_projection
        d = self.slice_width
        n_proj = 1 if self.shared else T
        self.proj_w = uniform_param((n_proj, d, D), d, gen)  # token-major: T x d x D
        self.proj_b = uniform_param((n_proj, 1, D), d, gen)
        self.pos_TD = nn.Parameter(torch.zeros(T, D)) if cfg.token_pos_emb else None

    def forward_TBD(self, sparse_BI: Tensor, dense_BF: Tensor) -> Tensor:
        """Tokens in token-major storage.

        Args:
            sparse_BI: B x I pooled embeddings in semantic-group order.
            dense_BF: B x F raw dense features.

        Returns:
            x_TBD: T x B x D (contiguous).
        """
        if sparse_BI.dim() != 2 or sparse_BI.shape[1] != self.sparse_dim:
            raise ValueError(
                f"model/tokenizer.py: expected sparse_BI of shape B x {self.sparse_dim}, got {tuple(sparse_BI.shape)}"
            )
        if dense_BF.dim() != 2 or dense_BF.shape[1] != self.num_dense or dense_BF.shape[0] != sparse_BI.shape[0]:
            raise ValueError(
                f"model/tokenizer.py: expected dense_BF of shape {sparse_BI.shape[0]} x {self.num_dense}, "
                f"got {tuple(dense_BF.shape)}"
            )
        B, T, d = sparse_BI.shape[0], self.num_tokens, self.slice_width
        parts = [sparse_BI]
        if self.dense_input is not None:
            parts.append(self.dense_input(dense_BF).to(sparse_BI.dtype))
        pad = T * d - self.in_width
        if pad:
            parts.append(sparse_BI.new_zeros(B, pad))
        e_TBd = torch.cat(parts, dim=1).view(B, T, d).transpose(0, 1)
        if self.shared:
            x_TBD = torch.addmm(self.proj_b[0], e_TBd.reshape(T * B, d), self.proj_w[0]).view(T, B, -1)
        else:
            x_TBD = torch.baddbmm(self.proj_b, e_TBd, self.proj_w)
        if self.pos_TD is not None:
            x_TBD = x_TBD + self.pos_TD.unsqueeze(1)
        return x_TBD

    def forward(self, sparse_BI: Tensor, dense_BF: Tensor) -> Tensor:
        """Args: sparse_BI: B x I, dense_BF: B x F. Returns x_BTD: B x T x D (a view of token-major storage)."""
        return self.forward_TBD(sparse_BI, dense_BF).transpose(0, 1)

    def flops_per_sample(self) -> float:
        """Forward matmul FLOPs per sample (multiply-add = 2)."""
        dense = self.dense_input.flops_per_sample() if self.dense_input is not None else 0.0
        return dense + 2.0 * self.num_tokens * self.slice_width * self.d_model
