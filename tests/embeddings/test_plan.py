"""The default config's plan on 2 ranks: shards on both ranks, report bytes equal the live shards and
optimizer state, and regrouping by name survives the plan's key order."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from config import load_config
from embeddings.regroup import feature_order, pooled_to_model_input, sparse_dim
from embeddings.sharding import CPU_OPTIMIZERS, shard_sparse_arch
from embeddings.tables import build_sparse_arch, table_specs
from tests.embeddings.common import make_kjt

CPU = torch.device("cpu")


def _default_cfg(optimizer: str = "rowwise_adagrad"):
    return load_config(["--config", "configs/default.toml", "--embeddings.optimizer", optimizer], world_size=2)


def _live_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if hasattr(t, "local_shards"):
            total += sum(s.tensor.numel() * s.tensor.element_size() for s in t.local_shards())
        elif isinstance(t, torch.Tensor) and t.dim() > 0:
            total += t.numel() * t.element_size()
    return total


def _plan_and_bytes(optimizer: str) -> dict:
    cfg = _default_cfg(optimizer)
    arch = build_sparse_arch(cfg.features, cfg.embeddings, device=torch.device("meta"))
    dmp, report = shard_sparse_arch(arch, cfg.features, cfg.embeddings, device=CPU, world_size=dist.get_world_size())
    weights = [v for k, v in dmp.state_dict().items() if k.endswith(".weight")]
    optim_state = [v for per_param in dmp.fused_optimizer.state_dict()["state"].values() for v in per_param.values()]
    return {
        "report": report.to_dict(),
        "text": report.text(),
        "live_table_bytes": _live_bytes(weights),
        "live_optim_bytes": _live_bytes(optim_state),
    }


@pytest.mark.parametrize("optimizer", CPU_OPTIMIZERS)
def test_default_plan_uses_both_ranks_and_bytes_add_up(dist_pool, optimizer):
    cfg = _default_cfg(optimizer)
    results = dist_pool.run(_plan_and_bytes, optimizer)
    report = results[0]["report"]
    assert report == results[1]["report"], "ranks disagree on the plan"
    ranks = {s["rank"] for t in report["tables"].values() for s in t["shards"]}
    assert ranks == {0, 1}, f"default plan keeps every shard on ranks {ranks}"
    assert all(t["sharding_type"] != "data_parallel" for t in report["tables"].values())
    specs = table_specs(cfg.features, cfg.embeddings)
    assert sum(report["table_bytes_per_rank"]) == sum(4 * s.num_embeddings * s.dim for s in specs)
    for rank, r in enumerate(results):
        assert r["live_table_bytes"] == report["table_bytes_per_rank"][rank], f"rank {rank} table bytes"
        assert r["live_optim_bytes"] == report["optimizer_bytes_per_rank"][rank], f"rank {rank} {optimizer} bytes"
    if optimizer == "rowwise_adagrad":  # one fp32 accumulator per row: the shards' rows add up to the tables'
        assert sum(report["optimizer_bytes_per_rank"]) == sum(4 * s.num_embeddings for s in specs)
    assert "rank 1: tables" in results[0]["text"]


def _regroup_by_name() -> dict:
    cfg = _default_cfg()
    f = cfg.features
    ws, rank = dist.get_world_size(), dist.get_rank()
    emb = cfg.embeddings
    emb.sharding = "table_wise"
    dmp, _ = shard_sparse_arch(
        build_sparse_arch(f, emb, device=torch.device("meta"), seed=4), f, emb, device=CPU, world_size=ws
    )
    ref = build_sparse_arch(f, emb, device=CPU, seed=4)
    kjt_all = make_kjt(f, range(8), seed=3, total=8)
    mine = range(rank * 4, rank * 4 + 4)
    kt = dmp(make_kjt(f, mine, seed=3, total=8))
    x_BI = pooled_to_model_input(kt, f)
    # per-feature reference: unsharded lookups, concatenated by name in group order
    ref_kt = ref(kjt_all).to_dict()
    x_ref = torch.cat([ref_kt[n] for n in feature_order(f)], dim=1)[mine.start : mine.stop]
    # and an independent one for scalar features: the table row of the feature's id
    tables = {s.name: s for s in table_specs(f, emb)}
    by_name = {sf.name: sf for sf in f.sparse}
    ids = make_kjt(f, mine, seed=3, total=8).to_dict()
    weights = {k.split(".")[-2]: v for k, v in ref.state_dict().items() if k.endswith(".weight")}
    row_err, col = 0.0, 0
    for n in feature_order(f):
        sf = by_name[n]
        if sf.max_len == 1:
            rows = weights[tables[sf.table_name].name][ids[n].values()]
            row_err = max(row_err, (x_BI[:, col : col + sf.dim] - rows).abs().max().item())
        col += sf.dim
    return {
        "keys": list(kt.keys()),
        "shape": tuple(x_BI.shape),
        "err": (x_BI - x_ref).abs().max().item(),
        "row_err": row_err,
    }


def test_regroup_by_name_when_the_plan_reorders_keys(dist_pool):
    cfg = _default_cfg()
    order = feature_order(cfg.features)
    for r in dist_pool.run(_regroup_by_name):
        assert sorted(r["keys"]) == sorted(order)
        assert r["keys"] != order, "the plan kept config order; the test would not catch positional reads"
        assert r["shape"] == (4, sparse_dim(cfg.features))
        assert r["err"] < 1e-6 and r["row_err"] < 1e-6
