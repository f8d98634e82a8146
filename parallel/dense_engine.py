"""The one module that talks to DeepSpeed: engine config, optimizer, gradient clipping.

The dense model (RankMixer and its experts, never the embedding tables: DeepSpeed would broadcast
rank 0's table shards over the other ranks' at start, see `parallel.layout`) goes
into `deepspeed.initialize`. Expert parameters (marked by `parallel.expert_parallel`) get their own
optimizer parameter groups and are all-reduced only over the expert-data-parallel group.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from torch import nn

from config import JobConfig
from config.training import DENSE_OPTIMIZERS


def deepspeed_config(cfg: JobConfig) -> dict[str, Any]:
    """DeepSpeed JSON config generated from the TOML config (saved in the run directory).

    Clipping is done by `clip_grad_norm_` below, not by DeepSpeed: DeepSpeed averages per-rank norms,
    which is not the global norm once experts are sharded, and ep_size 2 must equal ep_size 1.
    bf16 runs under torch.autocast with fp32 master weights, so DeepSpeed's bf16 mode stays off.
    """
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]] = {
    "rmsprop": lambda groups, lr: torch.optim.RMSprop(groups, lr=lr, alpha=0.99, eps=1e-8),
    "adamw": lambda groups, lr: torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8),
    "adam": lambda groups, lr: torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8),
    "sgd": lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9),
}
"""The dense optimizer of each name of `config.training.DENSE_OPTIMIZERS` (exactly those)."""
assert tuple(OPTIMIZERS) == DENSE_OPTIMIZERS, "parallel/dense_engine.py: OPTIMIZERS must match DENSE_OPTIMIZERS"


def build_optimizer(model: nn.Module, cfg: JobConfig) -> torch.optim.Optimizer:
    """The dense optimizer (training.optimizer) over DeepSpeed MoE parameter groups."""
    t = cfg.training
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    param_groups: list[dict[str, Any]] = [
        {"name": "decay", "params": decay, "weight_decay": t.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    param_groups = [g for g in param_groups if g["params"]]
    param_groups = split_params_into_different_moe_groups_for_optimizer(param_groups)
    if t.optimizer not in OPTIMIZERS:
        raise ValueError(f"training.optimizer = {t.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[t.optimizer](param_groups, t.lr)


def init_engine(model: nn.Module, cfg: JobConfig, run_dir: Path | None) -> Any:
    """`deepspeed.initialize` on the dense model; writes ds_config.json into the run directory."""
    ds_cfg = deepspeed_config(cfg)
    if run_dir is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "ds_config.json").write_text(json.dumps(ds_cfg, indent=2) + "\n")
    optimizer = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    return engine


def set_dense_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm (every expert counted once) and return that norm (a 0-dim float64
    tensor on the gradients' device: no host sync; `float()` it when logging).

    Call after `engine.backward` (gradients already reduced). Non-expert gradients are identical on
    every rank; expert gradients of each expert-parallel rank are summed over its group. Gradients are
    scaled by min(1, max_norm / (norm + 1e-6)) on the device (a factor of exactly 1 leaves them unchanged).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), dtype=torch.float64)
    grads = [p.grad for p in params]
    # sums of squares stay on the gradients' device (the expert parts are all-reduced there, the
    # backend's device)
    shared_sq = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    expert_sq: dict[str, torch.Tensor] = {}
    for p in params:
        sq = p.grad.detach().double().pow(2).sum()
        if is_moe_param(p):
            expert_sq[p.group_name] = expert_sq.get(p.group_name, torch.zeros_like(shared_sq)) + sq
        else:
            shared_sq += sq
    total = shared_sq
    for name in sorted(expert_sq):
        part = expert_sq[name]
        group = groups._get_expert_parallel_group(name)
        if dist.get_world_size(group) > 1:
            dist.all_reduce(part, group=group)
        total = total + part
    norm = total.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norm
