"""The dense features' way into a model: per-feature transforms, missing values, bucket embeddings.

    dense_BF (raw values; NaN = missing) --+--> continuous f: [sign-log1p] -> clip -> (x - mean) / std,
                                           |    missing -> 0 (the mean), optional missing flag
                                           |    --> one Linear(-> model.dense_proj_dim)
                                           +--> bucketized f: equal-frequency bucket (0 = missing) -> embedding
    dense_BZ = [projection | bucket embeddings]      (Z = out_width)

The transform of every feature is a set of buffers (log flag, clip bounds, mean, std, bucket edges),
neutral at construction (no transform) and filled from the training statistics by the trainer
(`set_stats`), so they are saved with the weights and an exported model transforms exactly as the
trained one did. Which features are bucketized, the bucket count and the missing flags come from the
config (`DenseInputSpec`), so shapes never depend on the data.

Legend: B batch, F dense features, Z output width, R buckets + 1 (row 0: missing), C bucket embedding width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import DenseInputSpec
from model.init import uniform_param


class DenseInput(nn.Module):
    """dense_BF (NaN = missing) -> dense_BZ.

    Args:
        spec: which features are bucketized, bucket count and width, missing flags.
        proj_dim: width of the projection of the continuous features (model.dense_proj_dim).
        gen: generator for the initialisation.

    Example:
        >>> m = DenseInput(DenseInputSpec(num_features=3, bucketized=(2,), num_buckets=4, bucket_dim=2), 5,
        ...                torch.Generator().manual_seed(0))
        >>> m(torch.tensor([[1.0, float("nan"), 7.0]])).shape
        torch.Size([1, 7])
    """

    def __init__(self, spec: DenseInputSpec, proj_dim: int, gen: torch.Generator) -> None:
        super().__init__()
        F = spec.num_features
        self.spec = spec
        self.cont = [i for i in range(F) if i not in spec.bucketized]
        for name, value in (("log1p_F", 0.0), ("clip_lo_F", -torch.inf), ("clip_hi_F", torch.inf), ("mean_F", 0.0)):
            self.register_buffer(name, torch.full((F,), value))
        self.register_buffer("std_F", torch.ones(F))
        self.register_buffer("edges_FR", torch.zeros(len(spec.bucketized), max(spec.num_buckets - 1, 0)))
        self.proj_in = len(self.cont) + (F if spec.missing_flags else 0)
        self.proj_dim = proj_dim if self.proj_in else 0
        if self.proj_in:
            self.proj_w = uniform_param((self.proj_in, proj_dim), self.proj_in, gen)
            self.proj_b = uniform_param((proj_dim,), self.proj_in, gen)
        self.buckets = nn.ParameterList(
            uniform_param((spec.num_buckets + 1, spec.bucket_dim), spec.num_buckets + 1, gen) for _ in spec.bucketized
        )
        self.out_width = self.proj_dim + len(spec.bucketized) * spec.bucket_dim

    @torch.no_grad()
    def set_stats(
        self,
        log1p: list[bool],
        clip_lo: list[float],
        clip_hi: list[float],
        mean: list[float],
        std: list[float],
        edges: list[list[float]],
    ) -> None:
        """Fill the transform buffers: one value per feature (F), and the bucket edges per bucketized feature."""
        F = self.spec.num_features
        for name, values in (("log1p_F", log1p), ("clip_lo_F", clip_lo), ("clip_hi_F", clip_hi), ("mean_F", mean)):
            if len(values) != F:
                raise ValueError(f"DenseInput.set_stats: {name} needs {F} values, got {len(values)}")
            getattr(self, name).copy_(torch.tensor(values, dtype=torch.float32))
        self.std_F.copy_(torch.tensor([s if s > 0 else 1.0 for s in std], dtype=torch.float32))
        if self.spec.bucketized:
            self.edges_FR.copy_(torch.tensor(edges, dtype=torch.float32).view_as(self.edges_FR))

    def transform(self, dense_BF: Tensor) -> tuple[Tensor, Tensor]:
        """(x_BF standardized with missing -> 0, missing_BF as 0/1) for every feature (float32)."""
        x = dense_BF.float()
        missing = torch.isnan(x)
        x = torch.where(self.log1p_F > 0, torch.sign(x) * torch.log1p(x.abs()), x)
        x = torch.minimum(torch.maximum(x, self.clip_lo_F), self.clip_hi_F)
        x = (x - self.mean_F) / self.std_F
        return torch.where(missing, torch.zeros_like(x), x), missing.float()

    def forward(self, dense_BF: Tensor) -> Tensor:
        """dense_BF: B x F raw values (NaN = missing) -> dense_BZ: B x out_width."""
        parts = []
        if self.proj_in:
            x_BF, miss_BF = self.transform(dense_BF)
            cont = x_BF[:, self.cont] if len(self.cont) < self.spec.num_features else x_BF
            inputs = torch.cat([cont, miss_BF], 1) if self.spec.missing_flags else cont
            parts.append(torch.addmm(self.proj_b, inputs.to(self.proj_w.dtype), self.proj_w))
        raw = dense_BF.float()
        for j, (f, table) in enumerate(zip(self.spec.bucketized, self.buckets)):
            v = raw[:, f]
            bucket = torch.searchsorted(self.edges_FR[j], v.contiguous(), right=True) + 1
            bucket = torch.where(torch.isnan(v), torch.zeros_like(bucket), bucket)
            parts.append(table[bucket])
        if not parts:
            return dense_BF.new_zeros(dense_BF.shape[0], 0)
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def flops_per_sample(self) -> float:
        """The projection's matmul (multiply-add = 2); transforms and lookups are not counted."""
        return 2.0 * self.proj_in * self.proj_dim


def dense_inputs(model: nn.Module) -> list[DenseInput]:
    """Every DenseInput of `model` (one per zoo model)."""
    return [m for m in model.modules() if isinstance(m, DenseInput)]
