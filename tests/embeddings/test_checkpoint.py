"""Sparse checkpoints through DCP: save on 2 ranks / load on 1 (and the reverse), across plans.

The 1-rank side runs inside the pool on a new 1-rank subgroup per rank. Besides lookups right after
loading, one more training step is compared: it only matches if the fused optimizer state (row-wise
Adagrad accumulators) was resharded too.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from embeddings.checkpoint import load_sparse, save_sparse
from embeddings.config import EmbeddingsConfig
from embeddings.regroup import pooled_to_model_input
from embeddings.sharding import shard_sparse_arch
from embeddings.tables import build_sparse_arch
from tests.embeddings.common import make_kjt, small_features

B = 6
CPU = torch.device("cpu")


def _dmp(sharding: str, world_size: int, pg=None, seed: int = 0):
    feats = small_features()
    emb = EmbeddingsConfig(sharding=sharding, optimizer="rowwise_adagrad", lr=0.2)
    arch = build_sparse_arch(feats, emb, device=torch.device("meta"), seed=seed)
    dmp, _ = shard_sparse_arch(arch, feats, emb, device=CPU, world_size=world_size, pg=pg)
    return dmp


def _lookup(dmp, rows: range, total: int) -> torch.Tensor:
    with torch.no_grad():
        return pooled_to_model_input(dmp(make_kjt(small_features(), rows, seed=11, total=total)), small_features())


def _train(dmp, rows: range, total: int, seed: int) -> None:
    feats = small_features()
    x = pooled_to_model_input(dmp(make_kjt(feats, rows, seed=seed, total=total)), feats)
    x.pow(2).sum().div(len(rows)).backward()


def _subgroup() -> dist.ProcessGroup:
    """A 1-rank group holding global rank 0 (collective: every rank makes it). TorchRec places shards by
    global rank ("rank:0/cpu"), so a 1-rank DMP only works on the subgroup that contains rank 0."""
    return dist.new_group([0])


def _resync_group_names() -> None:
    """After rank 0 worked alone on its 1-rank subgroup, TorchRec/DCP had created a DeviceMesh group on
    rank 0 only, so the next `new_group` on the two ranks got different auto names and gloo hung.
    Process groups are named from a per-process counter: bring every rank to the highest one.
    (Test-only: real jobs run the same code on every rank.)"""
    n = torch.tensor([c10d._world.group_count])
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    c10d._world.group_count = int(n.item())


def _gather(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _save2_load1(path: str) -> dict:
    rank, ws = dist.get_rank(), dist.get_world_size()
    mine, total = range(rank * B, rank * B + B), ws * B
    dmp2 = _dmp("row_wise", ws, seed=5)
    _train(dmp2, mine, total, seed=1)
    save_sparse(dmp2, path)
    before = _gather(_lookup(dmp2, mine, total))
    _train(dmp2, mine, total, seed=2)
    after = _gather(_lookup(dmp2, mine, total))
    sub = _subgroup()
    out = {}
    if rank == 0:
        dmp1 = _dmp("table_wise", 1, pg=sub, seed=99)  # different seed: loading must overwrite it
        fresh = _lookup(dmp1, range(total), total)
        load_sparse(dmp1, path)
        loaded = _lookup(dmp1, range(total), total)
        _train(dmp1, range(total), total, seed=2)
        loaded_after = _lookup(dmp1, range(total), total)
        out = {
            "fresh_differs": (fresh - before).abs().max().item(),
            "load_err": (loaded - before).abs().max().item(),
            "step_err": (loaded_after - after).abs().max().item(),
            "moved": (after - before).abs().max().item(),
        }
    _resync_group_names()
    return out


def _save1_load2(path: str) -> dict:
    rank, ws = dist.get_rank(), dist.get_world_size()
    mine, total = range(rank * B, rank * B + B), ws * B
    sub = _subgroup()
    ref: list = [None, None]
    if rank == 0:
        dmp1 = _dmp("row_wise", 1, pg=sub, seed=5)
        _train(dmp1, range(total), total, seed=1)
        save_sparse(dmp1, path)
        before = _lookup(dmp1, range(total), total)
        _train(dmp1, range(total), total, seed=2)
        ref = [before, _lookup(dmp1, range(total), total)]
    _resync_group_names()
    box = [ref]
    dist.broadcast_object_list(box, src=0)
    before, after = box[0]
    dmp2 = _dmp("table_row_wise", ws, seed=99)
    load_sparse(dmp2, path)
    loaded = _lookup(dmp2, mine, total)
    _train(dmp2, mine, total, seed=2)
    loaded_after = _lookup(dmp2, mine, total)
    return {
        "fresh_differs": (_lookup(_dmp("table_row_wise", ws, seed=99), mine, total) - before[mine]).abs().max().item(),
        "load_err": (loaded - before[mine]).abs().max().item(),
        "step_err": (loaded_after - after[mine]).abs().max().item(),
        "moved": (after - before).abs().max().item(),
    }


@pytest.mark.parametrize("worker", [_save2_load1, _save1_load2], ids=["save2_load1", "save1_load2"])
def test_resharded_checkpoint_round_trip(dist_pool, tmp_path, worker):
    for rank, r in enumerate(dist_pool.run(worker, str(tmp_path / "sparse"))):
        if not r:  # rank 1 only takes part in the 2-rank half of _save2_load1
            continue
        assert r["fresh_differs"] > 1e-3, f"rank {rank}: the loading side started equal; the test proves nothing"
        assert r["moved"] > 1e-4, f"rank {rank}: the extra step changed nothing"
        assert r["load_err"] < 1e-6, f"rank {rank}: lookups after load differ by {r['load_err']}"
        assert r["step_err"] < 1e-5, f"rank {rank}: next step differs by {r['step_err']} (optimizer state?)"


def test_load_missing_checkpoint_names_the_path(tmp_path):
    from checkpoint.format import CheckpointError

    with pytest.raises(CheckpointError, match="nowhere: no DCP .metadata"):
        load_sparse(None, str(tmp_path / "nowhere"))  # type: ignore[arg-type]
