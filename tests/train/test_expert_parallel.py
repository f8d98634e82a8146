"""Experts sharded by token position over 2 ranks equal the unsharded experts (outputs and gradients)."""

from __future__ import annotations

import torch
import torch.distributed as dist

T, E, D, KE, B = 4, 3, 8, 2, 5


def _full_experts():
    from model.moe import PerTokenExperts

    return PerTokenExperts(list(range(T)), E, D, KE, layer=0, seed=7)


def _ep_vs_full(ep_size: int) -> dict[str, float]:
    import deepspeed

    from model.moe import PerTokenExperts
    from parallel.expert_parallel import ExpertParallelExperts, owned_positions

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    x_all = torch.randn(T, world * B, D, generator=g)  # token-major, like the model
    gates_all = torch.relu(torch.randn(T, world * B, E, generator=g))  # about half the gates are zero
    w_all = torch.randn(T, world * B, D, generator=g)

    full = _full_experts()
    ref = full(x_all, gates_all)
    (ref * w_all).sum().backward()

    ep_rank = rank % ep_size
    pos = owned_positions(T, ep_size, ep_rank)
    shard = PerTokenExperts(pos, E, D, KE, layer=0, seed=7)
    wrapped = ExpertParallelExperts(shard, T, ep_size)
    rows = slice(rank * B, (rank + 1) * B)
    x = x_all[:, rows].contiguous().requires_grad_(True)
    out = wrapped(x, gates_all[:, rows].contiguous())
    # each rank's loss is its share of the global sum: gradients add up across ranks
    (out * w_all[:, rows]).sum().backward()
    errs = {"out": float((out - ref[:, rows]).abs().max())}
    full_params = dict(full.named_parameters())
    for name, p in shard.named_parameters():
        want = full_params[name].grad[pos[0] : pos[-1] + 1]
        # expert grads on an expert-parallel rank already hold both ranks' contributions; with ep 1 each rank
        # holds only its own rows' contribution and DeepSpeed's data-parallel all-reduce sums them.
        got = p.grad.clone()
        if ep_size == 1:
            dist.all_reduce(got)
        errs[f"grad/{name}"] = float((got - want).abs().max())
        errs[f"weight/{name}"] = float((p.detach() - full_params[name].detach()[pos[0] : pos[-1] + 1]).abs().max())
    errs["local_params"] = sum(p.numel() for p in shard.parameters())
    errs["total_params"] = sum(p.numel() for p in full.parameters())
    errs["allreduce_flags"] = float(all(getattr(p, "allreduce", True) is False for p in shard.parameters()))
    return errs


def test_ep2_matches_unsharded_experts(dist_pool) -> None:
    for errs in dist_pool.run(_ep_vs_full, 2):
        assert errs["local_params"] * 2 == errs["total_params"], "each rank must hold exactly half the experts"
        assert errs["allreduce_flags"] == 1.0
        for k, v in errs.items():
            if k.startswith(("out", "grad/", "weight/")):
                assert v < 1e-5, f"{k} differs by {v}"


def test_ep1_matches_unsharded_experts(dist_pool) -> None:
    for errs in dist_pool.run(_ep_vs_full, 1):
        assert errs["local_params"] == errs["total_params"]
        for k, v in errs.items():
            if k.startswith(("out", "grad/", "weight/")):
                assert v < 1e-5, f"{k} differs by {v}"
