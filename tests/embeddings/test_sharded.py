"""2-rank (gloo) sharded tables against a single-process unsharded reference, per sharding type.

Each rank looks up its half of a 2B-row batch with a per-rank mean loss; the reference looks up all
2B rows with a mean loss. TorchRec divides embedding gradients by the world size in the all-to-all
backward, so both sides must produce the same updates (2 ranks x B rows update the tables exactly like
1 rank x 2B rows).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from embeddings.config import EmbeddingsConfig
from embeddings.pipelining import finish_lookup, pipelinable, start_lookup
from embeddings.regroup import pooled_to_model_input, sparse_dim
from embeddings.sharding import CPU_SHARDING_TYPES, set_sparse_lr, shard_sparse_arch
from embeddings.tables import build_sparse_arch
from tests.embeddings.common import local_tables, make_kjt, shard_errors, small_features, unsharded_tables

B = 6  # rows per rank
HOT = 12  # ids drawn from [0, HOT): rows >= HOT are never looked up
CPU = torch.device("cpu")
META = torch.device("meta")


@torch.no_grad()
def _reference_step(ref: torch.nn.Module, optimizer: str, lr: float, eps: float, state: dict, col_blocks: dict) -> None:
    """Plain-PyTorch SGD / row-wise Adagrad on the unsharded tables (dense grads).

    Row-wise Adagrad keeps one accumulator per row of each column shard, so column-wise shards are
    reproduced with per-block accumulators (`col_blocks[name]` = list of (col0, cols))."""
    for name, bag in ref.ebc.embedding_bags.items():
        w, g = bag.weight, bag.weight.grad
        if optimizer == "sgd":
            w -= lr * g
        else:
            for c0, n in col_blocks.get(name, [(0, w.shape[1])]):
                gb = g[:, c0 : c0 + n]
                acc = state.setdefault((name, c0), torch.zeros(w.shape[0]))
                acc += gb.pow(2).mean(dim=1)
                w[:, c0 : c0 + n] -= lr * gb / (acc.sqrt() + eps).unsqueeze(1)
        bag.weight.grad = None


def _sharded_vs_reference(sharding: str, optimizer: str) -> dict:
    rank, ws = dist.get_rank(), dist.get_world_size()
    feats = small_features()
    lr = 1.0 if optimizer == "sgd" else 0.3
    emb = EmbeddingsConfig(sharding=sharding, optimizer=optimizer, lr=lr, eps=1e-8)
    dmp, report = shard_sparse_arch(
        build_sparse_arch(feats, emb, device=META, seed=3), feats, emb, device=CPU, world_size=ws
    )
    ref = build_sparse_arch(feats, emb, device=CPU, seed=3)
    w0 = unsharded_tables(ref)
    init_err = shard_errors(local_tables(dmp), w0)
    col_blocks = {n: sorted({(s.col0, s.cols) for s in t.shards}) for n, t in report.tables.items()}
    coeff = torch.randn(ws * B, sparse_dim(feats), generator=torch.Generator().manual_seed(7))
    mine = slice(rank * B, rank * B + B)
    fwd_err, state = 0.0, {}
    for step in range(2):
        x = pooled_to_model_input(dmp(make_kjt(feats, range(mine.start, mine.stop), step + 1, ws * B, HOT)), feats)
        x_ref = pooled_to_model_input(ref(make_kjt(feats, range(ws * B), step + 1, ws * B, HOT)), feats)
        fwd_err = max(fwd_err, (x - x_ref[mine]).abs().max().item())
        (x * coeff[mine]).sum().div(B).backward()
        (x_ref * coeff).sum().div(ws * B).backward()
        _reference_step(ref, optimizer, lr, 1e-8, state, col_blocks)
    after = local_tables(dmp)
    untouched = {n: [(r0, c0, t[max(0, HOT - r0) :]) for r0, c0, t in items] for n, items in after.items()}
    moved = max(
        ((after[n][i][2] - w0[n][r0 : r0 + t.shape[0], c0 : c0 + t.shape[1]]).abs().max().item())
        for n in after
        for i, (r0, c0, t) in enumerate(after[n])
        if t.numel()
    )
    return {
        "types": {n: t.sharding_type for n, t in report.tables.items()},
        "ranks": sorted({s.rank for t in report.tables.values() for s in t.shards}),
        "init_err": init_err,
        "fwd_err": fwd_err,
        "step_err": shard_errors(after, unsharded_tables(ref)),
        "untouched_err": shard_errors(
            {n: [(r0 + max(0, HOT - r0), c0, t) for r0, c0, t in v] for n, v in untouched.items()}, w0
        ),
        "moved": moved,
    }


@pytest.mark.parametrize("sharding", CPU_SHARDING_TYPES)
def test_sharded_matches_unsharded_reference(dist_pool, sharding):
    for optimizer in ("sgd", "rowwise_adagrad"):
        results = dist_pool.run(_sharded_vs_reference, sharding, optimizer)
        for rank, r in enumerate(results):
            where = f"{sharding}/{optimizer} rank {rank}"
            assert set(r["types"].values()) == {sharding}, where
            assert r["ranks"] == [0, 1], f"{where}: shards only on {r['ranks']}"
            assert r["init_err"] == 0.0, f"{where}: sharded init differs from unsharded init"
            assert r["fwd_err"] < 1e-6, f"{where}: pooled outputs differ by {r['fwd_err']}"
            assert r["step_err"] < 1e-5, f"{where}: weights after 2 fused steps differ by {r['step_err']}"
            assert r["untouched_err"] == 0.0, f"{where}: rows never looked up changed"
        assert max(r["moved"] for r in results) > 1e-3, f"{sharding}/{optimizer}: nothing was updated"


def _lr_effect() -> float:
    """Change the fused lr after sharding: the SGD update must follow the new lr."""
    ws, rank = dist.get_world_size(), dist.get_rank()
    feats = small_features()
    emb = EmbeddingsConfig(sharding="row_wise", optimizer="sgd", lr=1.0)
    dmp, _ = shard_sparse_arch(build_sparse_arch(feats, emb, device=META), feats, emb, device=CPU, world_size=ws)
    ref = build_sparse_arch(feats, emb, device=CPU)
    set_sparse_lr(dmp, 0.25)
    x = pooled_to_model_input(dmp(make_kjt(feats, range(rank * B, rank * B + B), 1, ws * B)), feats)
    x.sum().div(B).backward()
    pooled_to_model_input(ref(make_kjt(feats, range(ws * B), 1, ws * B)), feats).sum().div(ws * B).backward()
    _reference_step(ref, "sgd", 0.25, 0.0, {}, {})
    return shard_errors(local_tables(dmp), unsharded_tables(ref))


def test_set_sparse_lr_changes_the_fused_update(dist_pool):
    assert max(dist_pool.run(_lr_effect)) < 1e-6


def _pipelined_vs_plain(sharding: str) -> dict:
    """Two DMPs with the same tables: one looks up with dmp(kjt), the other with batch i+1's input dist
    started before step i's backward (the fused optimizer's update) and finished after it."""
    ws, rank = dist.get_world_size(), dist.get_rank()
    feats = small_features()  # has mean-pooled features (c, sb)
    emb = EmbeddingsConfig(sharding=sharding, optimizer="rowwise_adagrad", lr=0.3)
    plain, _ = shard_sparse_arch(
        build_sparse_arch(feats, emb, device=META, seed=3), feats, emb, device=CPU, world_size=ws
    )
    piped, _ = shard_sparse_arch(
        build_sparse_arch(feats, emb, device=META, seed=3), feats, emb, device=CPU, world_size=ws
    )
    assert pipelinable(piped)
    coeff = torch.randn(B, sparse_dim(feats), generator=torch.Generator().manual_seed(7 + rank))
    batches = [make_kjt(feats, range(rank * B, rank * B + B), s + 1, ws * B, HOT) for s in range(4)]
    w0 = _tables_of(plain)
    err, started = 0.0, start_lookup(piped, batches[0])
    for step, kjt in enumerate(batches):
        x = pooled_to_model_input(plain(kjt), feats)
        y = pooled_to_model_input(finish_lookup(piped, started), feats)
        if step + 1 < len(batches):
            started = start_lookup(piped, batches[step + 1])  # in flight across this step's update
        err = max(err, (x - y).abs().max().item())
        (x * coeff).sum().backward()
        (y * coeff).sum().backward()
    return {
        "fwd_err": err,
        "table_err": shard_errors(local_tables(piped), _tables_of(plain)),
        "moved": max((t - w0[n]).abs().max().item() for n, t in _tables_of(plain).items() if t.numel()),
    }


def _tables_of(dmp: torch.nn.Module) -> dict:
    """Full tables assembled from this rank's shards of `dmp` (comparable with shard_errors)."""
    out = {}
    for name, shards in local_tables(dmp).items():
        rows = max(r0 + t.shape[0] for r0, _, t in shards) if shards else 0
        cols = max(c0 + t.shape[1] for _, c0, t in shards) if shards else 0
        full = torch.zeros(rows, cols)
        for r0, c0, t in shards:
            full[r0 : r0 + t.shape[0], c0 : c0 + t.shape[1]] = t
        out[name] = full
    return out


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_pipelined_lookup_equals_the_plain_one(dist_pool, sharding):
    for r in dist_pool.run(_pipelined_vs_plain, sharding):
        assert r["fwd_err"] == 0.0 and r["table_err"] == 0.0 and r["moved"] > 1e-3, r
