"""Multi-layer perceptrons shared by the zoo: the deep networks of the baselines and one tower per task.

    mlp(in_dim, [64, 32], gen)            Linear -> [BatchNorm] -> ReLU -> [Dropout] per hidden layer
    Towers(d_in, [64], K, gen)            K such MLPs ending in one logit each: B x d_in -> logits_BK

Dropout (`model.dropout`) and batch norm (`model.batch_norm`) apply to hidden layers only, never to a
final output layer. Batch-norm running statistics are buffers: under data parallelism they are
averaged over ranks before evaluation and checkpoints (`parallel.distributed.average_buffers`).
Initialisation is PyTorch's default U(-1/sqrt(in), 1/sqrt(in)), drawn from a local generator.

Legend: B batch, K tasks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def linear(in_dim: int, out_dim: int, gen: torch.Generator) -> nn.Linear:
    """An `nn.Linear` initialised like PyTorch's default from `gen` (`skip_init`: the global RNG is not drawn)."""
    layer = nn.utils.skip_init(nn.Linear, in_dim, out_dim)
    bound = 1.0 / math.sqrt(in_dim)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)
    return layer


def mlp(
    in_dim: int,
    widths: list[int],
    gen: torch.Generator,
    *,
    final_activation: bool,
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Sequential:
    """Linear layers `in_dim -> widths[0] -> ... -> widths[-1]`, ReLU (+ batch norm, dropout) between them.

    Args:
        in_dim: input width.
        widths: output width of every layer (empty gives an identity).
        gen: generator for the initialisation.
        final_activation: treat the last layer as hidden too (ReLU, batch norm and dropout after it).
        dropout: dropout probability after each hidden layer's activation.
        batch_norm: BatchNorm1d between each hidden layer and its activation.
    """
    layers: list[nn.Module] = []
    prev = in_dim
    for i, width in enumerate(widths):
        layers.append(linear(prev, width, gen))
        if i < len(widths) - 1 or final_activation:
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        prev = width
    return nn.Sequential(*layers)


def linear_flops(module: nn.Module) -> float:
    """Forward GEMM FLOPs per sample of every `nn.Linear` inside `module` (2 x in x out each)."""
    return float(sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)))


class Towers(nn.Module):
    """One MLP per task: d_in -> hidden... -> 1.

    Args:
        d_in: input width.
        hidden: hidden widths (model.tower_hidden).
        num_tasks: K.
        gen: generator for the initialisation.
        dropout, batch_norm: as in `mlp`, on the hidden layers.
    """

    def __init__(
        self, d_in: int, hidden: list[int], num_tasks: int, gen: torch.Generator, dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        if any(int(h) < 1 for h in hidden):
            raise ValueError(f"model/mlp.py: model.tower_hidden must hold positive widths, got {list(hidden)}")
        self.towers = nn.ModuleList(
            mlp(d_in, [*hidden, 1], gen, final_activation=False, dropout=dropout, batch_norm=batch_norm)
            for _ in range(num_tasks)
        )

    def forward(self, h_BD: Tensor) -> Tensor:
        """h_BD: B x d_in -> logits_BK: B x K, in fp32 also under bf16 autocast: each tower's last layer (one
        logit) runs with autocast off, so scores are not rounded to bf16's 8 bits before the loss and AUC
        (bf16 would tie scores that differ in the third digit)."""
        logits = []
        for tower in self.towers:
            *body, head = tower
            h = h_BD
            for layer in body:
                h = layer(h)
            with torch.autocast(h.device.type, enabled=False):
                logits.append(head(h.float()))
        return torch.cat(logits, dim=1)

    def flops_per_sample(self) -> float:
        return linear_flops(self)
