"""Expert parallelism for RankMixer's per-token experts, on DeepSpeed's expert-parallel groups.

DeepSpeed's stock `MoE` layer flattens tokens and routes them over one shared pool of experts with
a capacity limit (stack-notes trap 5). RankMixer's experts belong to token positions, so we shard
by position instead: in an expert-parallel group of size P, rank p owns token positions
[p T/P, (p+1) T/P) and all their experts. One all-to-all sends every rank's states for those
positions (and their gates) to rank p, which runs its experts over P x B rows, and one all-to-all
sends the outputs back. No token is dropped and routing is exactly the model's.

Legend: B local batch, T tokens, t = T / P owned tokens, D width, E experts per token, P ep size.

The wrapper subclasses DeepSpeed's `MoE` only so that the engine recognises expert parameters: it
marks them `allreduce = False` with `group_name = "ep_size_<P>"`, so DeepSpeed all-reduces their
gradients only over the expert-data-parallel group and builds MoE optimizer parameter groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
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


def _a2a(x_PBtX: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all-to-all over the leading P axis (equal splits)."""
    out = torch.empty_like(x_PBtX)
    return dist_fn.all_to_all_single(out, x_PBtX, group=group)


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

    def forward(self, x_BTD: torch.Tensor, gates_BTE: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x_BTD: B x T x D states, gates_BTE: B x T x E gates -> B x T x D expert outputs."""
        B, T, D = x_BTD.shape
        P, E = self.ep_size, gates_BTE.shape[-1]
        t = T // P
        sizes = [torch.zeros(1, dtype=torch.long, device=x_BTD.device) for _ in range(P)]
        dist.all_gather(sizes, torch.tensor([B], device=x_BTD.device), group=self.group)
        if any(int(s) != B for s in sizes):
            raise RuntimeError(
                f"expert parallelism needs equal batch sizes in its group, got {[int(s) for s in sizes]}"
            )
        # P x B x t x D: block q holds this rank's rows for rank q's positions.
        x_PBtD = _a2a(x_BTD.view(B, P, t, D).transpose(0, 1).contiguous(), self.group)
        g_PBtE = _a2a(gates_BTE.view(B, P, t, E).transpose(0, 1).contiguous(), self.group)
        y_PBtD = self.local(x_PBtD.reshape(P * B, t, D), g_PBtE.reshape(P * B, t, E)).view(P, B, t, D)
        back_PBtD = _a2a(y_PBtD.contiguous(), self.group)
        return back_PBtD.transpose(0, 1).reshape(B, T, D)


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
