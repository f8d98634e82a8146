"""Tokenization: the grouped embedding vector of a sample -> T tokens of width D.

    sparse_BI (pooled embeddings, group order) --------------------------+
                                                                         +-- cat -> e_BZ -> zero-pad to T*d
    dense_BF -> DenseInput (transforms, projection, bucket embeddings) --+   -> T slices of width d
                                                                              slice t -> Proj_t -> x_t (width D)

With `model.tokenization = "groups"` the slices follow the semantic groups instead: each group
(`features.groups`, then the dense group) gets whole tokens in proportion to its width (at least one;
the rest by largest remainder), each group is cut into equal contiguous slices, and every slice is
zero-padded to the widest one (d = max slice width) so the same batched projection applies
(`token_layout`).

The dense features join as a final 'dense' group (`model.dense_input`: standardized values projected
to `model.dense_proj_dim`, then the bucket embeddings of bucketized features). With `model.feature_dots
= C` the pairwise dot products of the pooled sparse features (S = I / C features of width C) follow as
one more group, B x S (S - 1) / 2 columns in (0, 1), (0, 2), ..., (S - 2, S - 1) order:
DLRM's interaction, read by the token projections like any other input column. Projections are per
token by default (one batched matmul over the token axis), one shared projection as an option; an
optional learnable token position embedding is added last. The tokens are computed token-major
(T x B x D storage) because every later per-token matmul wants that layout; `forward` returns the
B x T x D *view* of it, which costs nothing, and `forward_TBD` the token-major tensor itself.

Initialisation draws from a local `torch.Generator` only (see `model.init`).

Legend: B batch, I pooled-embedding width, F dense features, S sparse features, Z = I + dense input width
(+ the S (S - 1) / 2 dot products), T tokens, d = ceil(Z / T) slice width, D token width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.config import DenseInputSpec, ModelConfig
from model.dense_input import DenseInput
from model.init import uniform_param


def token_layout(group_widths: list[int], num_tokens: int) -> list[tuple[int, int]]:
    """Where each token's slice lies when tokens follow semantic groups.

    Args:
        group_widths: width of each group, in input order (their sum is Z); zero-width groups are skipped.
        num_tokens: T, at least the number of non-empty groups.

    Returns:
        T (start, width) pairs over the Z-wide input, in order: group g gets n_g >= 1 tokens
        (n_g proportional to its width, remainders to the largest fractions, ties to the earlier group)
        and is cut into n_g contiguous slices whose widths differ by at most 1.

    Example:
        >>> token_layout([128, 128, 96, 48, 16], 8)
        [(0, 64), (64, 64), (128, 64), (192, 64), (256, 48), (304, 48), (352, 48), (400, 16)]
    """
    widths = [w for w in group_widths if w > 0]
    if num_tokens < len(widths):
        raise ValueError(
            f"model/tokenizer.py: model.tokenization = 'groups' needs model.num_tokens >= the number of groups "
            f"with features ({len(widths)}: features.groups plus the dense group), got {num_tokens}"
        )
    total = sum(widths)
    extra = num_tokens - len(widths)
    share = [w * extra / total for w in widths]
    counts = [1 + math.floor(x) for x in share]
    order = sorted(range(len(widths)), key=lambda g: (-(share[g] - math.floor(share[g])), g))
    for g in order[: num_tokens - sum(counts)]:
        counts[g] += 1
    layout, start = [], 0
    for w, n in zip(widths, counts):
        base, rem = divmod(w, n)
        for i in range(n):
            width = base + (1 if i < rem else 0)
            layout.append((start, width))
            start += width
    return layout


class Tokenizer(nn.Module):
    """sparse_BI (B x I) + dense_BF (B x F) -> x_BTD (B x T x D).

    Args:
        sparse_dim: I, width of the pooled embeddings concatenated in semantic-group order.
        dense: the dense input's shape (F features, bucketized ones, missing flags); F = 0: no dense group.
        cfg: the `model` config (num_tokens, d_model, dense_proj_dim, shared_projection, token_pos_emb).
        gen: generator for the initialisation (default: a fresh one seeded with 0).
        sparse_groups: widths of the semantic groups within the I pooled-embedding columns, in order
            (their sum is I); used by `model.tokenization = "groups"` (default: one group of width I).

    Example:
        >>> tok = Tokenizer(40, DenseInputSpec(3), ModelConfig(num_tokens=4, d_model=8, dense_proj_dim=4))
        >>> tok(torch.randn(2, 40), torch.randn(2, 3)).shape
        torch.Size([2, 4, 8])
    """

    def __init__(
        self,
        sparse_dim: int,
        dense: DenseInputSpec,
        cfg: ModelConfig,
        gen: torch.Generator | None = None,
        sparse_groups: tuple[int, ...] = (),
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
        self.dot_width = cfg.feature_dots  # C (0: no dot products)
        if self.dot_width and (sparse_dim % self.dot_width or sparse_dim < 2 * self.dot_width):
            raise ValueError(
                f"model/tokenizer.py: model.feature_dots = {self.dot_width} needs at least two sparse features of "
                f"that width (sparse_dim {sparse_dim} must be a multiple of it)"
            )
        self.num_sparse = sparse_dim // self.dot_width if self.dot_width else 0  # S
        self.num_dots = self.num_sparse * (self.num_sparse - 1) // 2
        if self.num_dots:  # flat index of (i, j), i < j, in the S x S Gram matrix
            upper = torch.triu_indices(self.num_sparse, self.num_sparse, 1)
            self.register_buffer("dot_index", upper[0] * self.num_sparse + upper[1], persistent=False)
        self.in_width = sparse_dim + self.dense_width + self.num_dots  # Z
        self.by_groups = cfg.tokenization == "groups"
        if self.by_groups:
            groups = list(sparse_groups) or [sparse_dim]
            if sum(groups) != sparse_dim:
                raise ValueError(
                    f"model/tokenizer.py: sparse_groups {list(sparse_groups)} must sum to sparse_dim ({sparse_dim})"
                )
            layout = token_layout([*groups, self.dense_width, self.num_dots], T)
            self.slice_width = max(w for _, w in layout)  # d
            # input column of every (token, slot); Z = the zero column appended in forward (padding)
            index = torch.full((T, self.slice_width), self.in_width, dtype=torch.int64)
            for t, (start, width) in enumerate(layout):
                index[t, :width] = torch.arange(start, start + width)
            self.register_buffer("slot_index", index.view(-1), persistent=False)
        else:
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
        if self.num_dots:
            parts.append(self.dots(sparse_BI))
        if self.by_groups:  # gather each token's slot columns (index Z = a zero column)
            parts.append(sparse_BI.new_zeros(B, 1))
            e_TBd = torch.cat(parts, dim=1).index_select(1, self.slot_index).view(B, T, d).transpose(0, 1)
        else:
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

    def dots(self, sparse_BI: Tensor) -> Tensor:
        """B x S (S - 1) / 2: <e_i, e_j> for every pair i < j of the S pooled features (C wide) of sparse_BI."""
        e_BSC = sparse_BI.view(sparse_BI.shape[0], self.num_sparse, self.dot_width)
        return torch.bmm(e_BSC, e_BSC.transpose(1, 2)).flatten(1).index_select(1, self.dot_index)

    def forward(self, sparse_BI: Tensor, dense_BF: Tensor) -> Tensor:
        """Args: sparse_BI: B x I, dense_BF: B x F. Returns x_BTD: B x T x D (a view of token-major storage)."""
        return self.forward_TBD(sparse_BI, dense_BF).transpose(0, 1)

    def flops_per_sample(self) -> float:
        """Forward matmul FLOPs per sample (multiply-add = 2)."""
        dense = self.dense_input.flops_per_sample() if self.dense_input is not None else 0.0
        dots = 2.0 * self.num_sparse**2 * self.dot_width  # the S x S Gram matrix, as computed
        return dense + dots + 2.0 * self.num_tokens * self.slice_width * self.d_model
