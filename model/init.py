"""Deterministic parameter initialisation from a local `torch.Generator` (never the global RNG).

Every parameter is drawn like PyTorch's `nn.Linear` default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), in
construction order from the generator the model was built with, so a seed fixes every weight on every
rank whatever the expert-parallel size (experts use their own per-(layer, position, expert) generators,
see `model.moe`).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def uniform_param(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> nn.Parameter:
    """A parameter of `shape` drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with `gen`.

    Args:
        shape: parameter shape.
        fan_in: input width of the linear map the parameter belongs to.
        gen: the generator to draw from (CPU generator; the parameter is created on CPU).
    """
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound, generator=gen))
