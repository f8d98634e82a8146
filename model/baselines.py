"""The baselines RankMixer is measured against: DLRM-MLP and DCNv2, behind the zoo's interface.

Both see exactly the inputs RankMixer sees: the pooled embeddings concatenated in semantic-group order
(`sparse_BI`) and the dense features through the same `DenseInput` (transformed values projected to
`model.dense_proj_dim`, plus bucket embeddings), the two joined into one vector `x0_BZ` of width Z.

    DLRMMLP: x0_BZ -> MLP (model.mlp_hidden, ReLU) -> one tower per task -> logits_BK
    DCNv2:   x0_BZ -> cross network (model.cross_layers full-rank layers) -> MLP -> towers   ("stacked")
             x0_BZ -> [cross network || MLP] -> concat -> towers                          ("parallel")

DCNv2 (Wang et al. 2021, "DCN V2") cross layer: `x_{l+1} = x0 * (W_l x_l + b_l) + x_l`, W_l full rank
I x I. We default to the **stacked** structure (cross network feeding the deep network); the parallel
structure is offered by the keyword argument `structure="parallel"`.

FLOPs convention (same as the RankMixer counter): forward FLOPs of the matrix multiplications only,
multiply-add = 2 FLOPs; bias adds, activations and the cross layer's elementwise products are not
counted (they are O(width), the GEMMs O(width^2)). Training = 3 x forward.

Initialisation is deterministic in `seed` and draws from a local `torch.Generator` only: building a
model does not touch the global RNG.

Legend: B batch, I pooled-embedding width, F dense features, Z model input width (I + model.dense_proj_dim),
M hidden width, K tasks.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import DenseInputSpec, ModelConfig
from model.dense_input import DenseInput
from model.mlp import Towers, linear, linear_flops, mlp
from model.output import ModelOutput

DCN_STRUCTURES = ("stacked", "parallel")


# ----------------------------------------------------------------------------- helpers


def _check_widths(widths: list[int], key: str) -> None:
    if any(int(w) <= 0 for w in widths):
        raise ValueError(f"model/baselines.py: config key {key} must hold positive widths, got {list(widths)}")


class _BaselineBase(nn.Module):
    """Shared parts: dense projection, input concatenation, per-task towers, the zoo interface.

    Subclasses set `self.body` (an nn.Module mapping x0_BZ to h_BM) and then call `_build_towers`, drawing
    their initialisation from the same generator `gen`, in construction order.
    """

    body: nn.Module

    def __init__(
        self, model: ModelConfig, *, sparse_dim: int, dense: DenseInputSpec, num_tasks: int, gen: torch.Generator
    ) -> None:
        super().__init__()
        num_dense = dense.num_features
        if sparse_dim <= 0:
            raise ValueError(f"model/baselines.py: sparse_dim (pooled embedding width I) must be > 0, got {sparse_dim}")
        if num_dense < 0:
            raise ValueError(f"model/baselines.py: features.dense count must be >= 0, got {num_dense}")
        if num_tasks <= 0:
            raise ValueError(f"model/baselines.py: num_tasks (label columns) must be > 0, got {num_tasks}")
        if num_dense > 0 and model.dense_proj_dim <= 0:
            raise ValueError(
                f"model/baselines.py: config key model.dense_proj_dim must be > 0, got {model.dense_proj_dim}"
            )
        _check_widths(model.mlp_hidden, "model.mlp_hidden")
        _check_widths(model.tower_hidden, "model.tower_hidden")
        self.sparse_dim = sparse_dim
        self.num_dense = num_dense
        self.num_tasks = num_tasks
        self.dense_input = DenseInput(dense, model.dense_proj_dim, gen) if num_dense > 0 else None
        self.input_dim = sparse_dim + (self.dense_input.out_width if self.dense_input is not None else 0)

    def _build_towers(self, in_dim: int, model: ModelConfig, gen: torch.Generator) -> None:
        """One MLP per task: `in_dim -> model.tower_hidden... -> 1` (model.dropout / batch_norm on hidden layers)."""
        self.towers = Towers(in_dim, list(model.tower_hidden), self.num_tasks, gen, model.dropout, model.batch_norm)

    def _inputs(self, sparse_BI: torch.Tensor, dense_BF: torch.Tensor) -> torch.Tensor:
        """Concatenate the pooled embeddings and the projected dense features.

        Args:
            sparse_BI: B x I pooled embeddings in semantic-group order.
            dense_BF: B x F raw dense features.

        Returns:
            x0_BZ: B x I with I = E + P.
        """
        name = type(self).__name__
        if sparse_BI.dim() != 2 or sparse_BI.shape[1] != self.sparse_dim:
            raise ValueError(
                f"model/baselines.py: {name} expects sparse_BI of shape B x {self.sparse_dim}, "
                f"got {tuple(sparse_BI.shape)}"
            )
        if dense_BF.dim() != 2 or dense_BF.shape[1] != self.num_dense or dense_BF.shape[0] != sparse_BI.shape[0]:
            raise ValueError(
                f"model/baselines.py: {name} expects dense_BF of shape {sparse_BI.shape[0]} x {self.num_dense}, "
                f"got {tuple(dense_BF.shape)}"
            )
        if self.dense_input is None:
            return sparse_BI
        return torch.cat([sparse_BI, self.dense_input(dense_BF).to(sparse_BI.dtype)], dim=1)

    def forward(self, sparse_BI: torch.Tensor, dense_BF: torch.Tensor) -> ModelOutput:
        """Score a batch.

        Args:
            sparse_BI: B x I pooled embeddings concatenated in semantic-group order.
            dense_BF: B x F raw dense features.

        Returns:
            ModelOutput with logits_BK (B x K), reg_loss = 0 (scalar), stats = {}.
        """
        h_BM = self.body(self._inputs(sparse_BI, dense_BF))
        logits_BK = self.towers(h_BM)
        return ModelOutput(logits_BK=logits_BK, reg_loss=logits_BK.new_zeros(()), stats={})

    def flops_per_sample(self, training: bool = False) -> float:
        """Analytic forward GEMM FLOPs per sample (multiply-add = 2); training=True gives 3 x forward."""
        dense = self.dense_input.flops_per_sample() if self.dense_input is not None else 0.0
        return (linear_flops(self) + dense) * (3.0 if training else 1.0)

    def num_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------- DLRM-MLP


class DLRMMLP(_BaselineBase):
    """DLRM-MLP: concatenated embeddings and projected dense features into an MLP, then one tower per task.

    Args:
        model: the `model` config section (mlp_hidden, tower_hidden, dense_proj_dim are read).
        sparse_dim: E, width of the pooled embedding vector.
        dense: the dense input's shape (F features, bucketized ones, missing flags).
        num_tasks: K, number of tasks (one tower and one logit each).
        seed: seed of the local generator used for initialisation.

    Example:
        >>> cfg = ModelConfig(mlp_hidden=[32], tower_hidden=[8])
        >>> m = DLRMMLP(cfg, sparse_dim=12, dense=DenseInputSpec(3), num_tasks=2)
        >>> m(torch.randn(5, 12), torch.randn(5, 3)).logits_BK.shape
        torch.Size([5, 2])
    """

    def __init__(
        self, model: ModelConfig, *, sparse_dim: int, dense: DenseInputSpec, num_tasks: int, seed: int = 0
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        super().__init__(model, sparse_dim=sparse_dim, dense=dense, num_tasks=num_tasks, gen=gen)
        self.body = mlp(
            self.input_dim, list(model.mlp_hidden), gen, final_activation=True, dropout=model.dropout,
            batch_norm=model.batch_norm,
        )  # fmt: skip
        self._build_towers(model.mlp_hidden[-1] if model.mlp_hidden else self.input_dim, model, gen)


# ----------------------------------------------------------------------------- DCNv2


class CrossLayer(nn.Module):
    """One full-rank DCNv2 cross layer: `x_{l+1} = x0 * (W x_l + b) + x_l`.

    Args:
        width: I, the width of x0 and x_l.
        gen: generator for the initialisation.
    """

    def __init__(self, width: int, gen: torch.Generator) -> None:
        super().__init__()
        self.linear = linear(width, width, gen)

    def forward(self, x0_BZ: torch.Tensor, xl_BZ: torch.Tensor) -> torch.Tensor:
        """Args: x0_BZ, xl_BZ: B x Z. Returns x_{l+1}: B x Z."""
        return x0_BZ * self.linear(xl_BZ) + xl_BZ


class DCNv2Body(nn.Module):
    """Cross network plus deep MLP, stacked or in parallel.

    Args:
        width: I, the input width.
        cross_layers: number of full-rank cross layers.
        mlp_hidden: hidden widths of the deep MLP (ReLU after every layer).
        structure: "stacked" (cross -> MLP) or "parallel" (concat(cross(x0), MLP(x0))).
        gen: generator for the initialisation.
        dropout, batch_norm: on the deep MLP's hidden layers (`model.mlp.mlp`).
    """

    def __init__(
        self, width: int, cross_layers: int, mlp_hidden: list[int], structure: str, gen: torch.Generator,
        dropout: float = 0.0, batch_norm: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.structure = structure
        self.cross = nn.ModuleList(CrossLayer(width, gen) for _ in range(cross_layers))
        self.mlp = mlp(width, mlp_hidden, gen, final_activation=True, dropout=dropout, batch_norm=batch_norm)
        deep_out = mlp_hidden[-1] if mlp_hidden else width
        self.out_dim = deep_out if structure == "stacked" else width + deep_out

    def cross_network(self, x0_BZ: torch.Tensor) -> torch.Tensor:
        """Apply the cross layers in order. Args: x0_BZ: B x I. Returns x_L: B x I."""
        xl_BZ = x0_BZ
        for layer in self.cross:
            xl_BZ = layer(x0_BZ, xl_BZ)
        return xl_BZ

    def forward(self, x0_BZ: torch.Tensor) -> torch.Tensor:
        """Args: x0_BZ: B x I. Returns h_BM: B x out_dim."""
        if self.structure == "stacked":
            return self.mlp(self.cross_network(x0_BZ))
        return torch.cat([self.cross_network(x0_BZ), self.mlp(x0_BZ)], dim=1)


class DCNv2(_BaselineBase):
    """DCNv2: a cross network of `model.cross_layers` full-rank layers and a deep MLP, then towers.

    structure="stacked" (default): x0 -> cross network -> MLP (model.mlp_hidden) -> towers.
    structure="parallel": cross network and MLP both read x0; their outputs are concatenated -> towers.

    Args:
        model: the `model` config section (cross_layers, mlp_hidden, tower_hidden, dense_proj_dim are read).
        sparse_dim: E, width of the pooled embedding vector.
        dense: the dense input's shape (F features, bucketized ones, missing flags).
        num_tasks: K, number of tasks.
        seed: seed of the local generator used for initialisation.
        structure: "stacked" or "parallel".

    Example:
        >>> m = DCNv2(ModelConfig(cross_layers=2, mlp_hidden=[32]), sparse_dim=12, dense=DenseInputSpec(3), num_tasks=2)
        >>> m(torch.randn(5, 12), torch.randn(5, 3)).logits_BK.shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        model: ModelConfig,
        *,
        sparse_dim: int,
        dense: DenseInputSpec,
        num_tasks: int,
        seed: int = 0,
        structure: str = "stacked",
    ) -> None:
        if model.cross_layers < 0:
            raise ValueError(
                f"model/baselines.py: config key model.cross_layers must be >= 0, got {model.cross_layers}"
            )
        if structure not in DCN_STRUCTURES:
            raise ValueError(f"model/baselines.py: DCNv2 structure must be one of {DCN_STRUCTURES}, got {structure!r}")
        gen = torch.Generator().manual_seed(seed)
        super().__init__(model, sparse_dim=sparse_dim, dense=dense, num_tasks=num_tasks, gen=gen)
        self.body = DCNv2Body(
            self.input_dim, model.cross_layers, list(model.mlp_hidden), structure, gen, model.dropout, model.batch_norm
        )
        self._build_towers(self.body.out_dim, model, gen)
