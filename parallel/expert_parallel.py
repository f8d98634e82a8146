"""Expert parallelism for RankMixer's per-token experts, on DeepSpeed's expert-parallel groups.

DeepSpeed's stock `MoE` layer flattens tokens and routes them over one shared pool of experts with
a capacity limit: token position is lost, tokens over capacity are dropped, and random token
selection breaks exact resume. RankMixer's experts belong to token positions, so we shard
by position instead: in an expert-parallel group of size P, rank p owns token positions
[p T/P, (p+1) T/P) and all their experts. One all-to-all sends every rank's states for those
positions (and their gates) to rank p, which runs its experts over P x B rows, and one all-to-all
sends the outputs back. No token is dropped and routing is exactly the model's.

Legend: B local batch, T tokens, t = T / P owned tokens, D width, E experts per token, P ep size,
N = P x B rows an owner runs per position.

The wrapper subclasses DeepSpeed's `MoE` only so that the engine recognises expert parameters: it
marks them `allreduce = False` with `group_name = "ep_size_<P>"`, so DeepSpeed all-reduces their
gradients only over the expert-data-parallel group and builds MoE optimizer parameter groups.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from model.moe import PerTokenExperts, moe_layers


def ep_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def create_ep_groups(ep_size: int) -> None:
    """DeepSpeed's expert-parallel and expert-data-parallel process groups for `ep_size` (idempotent)."""
    if ep_group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)


def owned_positions(num_tokens: int, ep_size: int, ep_rank: int) -> list[int]:
    """Token positions expert-parallel rank `ep_rank` owns."""
    t = num_tokens // ep_size
    return list(range(ep_rank * t, (ep_rank + 1) * t))


class _AllToAll(torch.autograd.Function):
    """All-to-all over the leading P axis with equal splits; its gradient is the same all-to-all back.

    Written on `dist.all_to_all_single` (torch.distributed.nn.functional's version is deprecated)."""

    @staticmethod
    def forward(ctx: Any, x_P: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        x_P = x_P.contiguous()
        out = torch.empty_like(x_P)
        dist.all_to_all_single(out, x_P, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_P: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad_P = grad_P.contiguous()
        out = torch.empty_like(grad_P)
        dist.all_to_all_single(out, grad_P, group=ctx.group)
        return out, None


def all_to_all(x_P: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all-to-all over the leading P axis (equal splits)."""
    return _AllToAll.apply(x_P, group)


class ExpertParallelExperts(MoE):
    """Same call signature as `PerTokenExperts` (full-T in, full-T out), experts sharded by position.

    Args:
        local: the experts of this rank's positions (`PerTokenExperts` built for `owned_positions`).
        num_tokens: T.
        ep_size: P.
    """

    def __init__(self, local: PerTokenExperts, num_tokens: int, ep_size: int) -> None:
        nn.Module.__init__(self)  # DeepSpeed's MoE.__init__ builds its own gate and experts: not wanted
        create_ep_groups(ep_size)
        self.local = local
        self.num_tokens = num_tokens
        self.ep_size = ep_size
        self.expert_group_name = ep_group_name(ep_size)
        self.num_experts = num_tokens * local.num_experts
        self.num_local_experts = len(local.positions) * local.num_experts
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.group = groups._get_expert_parallel_group(self.expert_group_name)
        for p in self.local.parameters():
            p.allreduce = False
            p.group_name = self.expert_group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine; our groups already exist (created in __init__)."""
        create_ep_groups(self.ep_size)

    @property
    def positions(self) -> list[int]:
        return self.local.positions

    def forward(self, x_TBD: torch.Tensor, gates_TBE: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x_TBD: T x B x D states, gates_TBE: T x B x E gates (token-major) -> T x B x D expert outputs.

        Token-major storage makes rank q's positions one contiguous block, so the outgoing all-to-all
        needs no copy and the returning one lands in T x B x D order; the owner permutes once in and
        once out to run its t positions over all P x B rows.
        """
        T, B, D = x_TBD.shape
        P, E = self.ep_size, gates_TBE.shape[-1]
        t = T // P
        sizes = [torch.zeros(1, dtype=torch.long, device=x_TBD.device) for _ in range(P)]
        dist.all_gather(sizes, torch.tensor([B], device=x_TBD.device), group=self.group)
        if any(int(s) != B for s in sizes):
            raise RuntimeError(
                f"expert parallelism needs equal batch sizes in its group, got {[int(s) for s in sizes]}"
            )
        # P x t x B x D: block q holds rank q's rows for this rank's t positions.
        x_PtBD = all_to_all(x_TBD.view(P, t, B, D), self.group)
        g_PtBE = all_to_all(gates_TBE.view(P, t, B, E), self.group)
        x_tND = x_PtBD.transpose(0, 1).reshape(t, P * B, D)  # N = P x B rows per owned position
        g_tNE = g_PtBE.transpose(0, 1).reshape(t, P * B, E)
        y_PtBD = self.local(x_tND, g_tNE).view(t, P, B, D).transpose(0, 1)
        return all_to_all(y_PtBD, self.group).view(T, B, D)


def shard_experts(model: nn.Module, ep_size: int, ep_rank: int, seed: int) -> int:
    """Replace every MoE layer's experts by this rank's shard; returns the local expert parameter count.

    ep_size 1 still wraps the experts (DeepSpeed then treats them as expert parameters replicated over
    the data-parallel group), so every layout goes through the same code path.
    """
    local_params = 0
    for layer in moe_layers(model):
        full = layer.experts
        if isinstance(full, ExpertParallelExperts):
            raise RuntimeError("experts are already sharded")
        num_tokens = len(full.positions)
        pos = owned_positions(num_tokens, ep_size, ep_rank)
        shard = PerTokenExperts(
            pos, full.num_experts, full.d_model, full.expert_mult, layer=full.layer, seed=full.seed
        ).to(next(full.parameters()).device)
        # Same weights as the positions of the full build (they were initialised per position).
        with torch.no_grad():
            for name, p in shard.named_parameters():
                p.copy_(dict(full.named_parameters())[name][pos[0] : pos[-1] + 1])
        layer.experts = ExpertParallelExperts(shard, num_tokens, ep_size)
        layer.sparse_inference = False  # eval runs the dense path through the all-to-all
        local_params += sum(p.numel() for p in shard.parameters())
    return local_params
