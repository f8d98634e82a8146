"""Managed-collision tables (TorchRec MCH, zero-collision hashing with eviction): raw ids far outside
the table are remapped into range, distinct ids get distinct rows, and the row-wise sharded version
runs on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.config import EmbeddingsConfig
from embeddings.regroup import pooled_to_model_input, sparse_dim
from embeddings.sharding import shard_sparse_arch
from embeddings.tables import build_sparse_arch
from pipeline.config import FeaturesConfig, SparseFeature

RAW = torch.tensor([10**12 + 7, 5, 10**15, 10**12 + 7, 99, 3, 2**62, 41])  # 7 distinct ids, one repeated


def _features() -> FeaturesConfig:
    return FeaturesConfig(
        dense=[],
        groups=["user", "item"],
        sparse=[
            SparseFeature(name="u", group="user", vocab_size=16, dim=4, id_mapping="raw"),
            SparseFeature(name="i", group="item", vocab_size=8, dim=4),
        ],
    )


def _kjt(raw: torch.Tensor) -> KeyedJaggedTensor:
    n = len(raw)
    items = torch.arange(n) % 8
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["u", "i"], values=torch.cat([raw, items]), lengths=torch.ones(2 * n, dtype=torch.long)
    )


def test_out_of_range_raw_ids_are_remapped_into_range_without_collisions():
    f = _features()
    arch = build_sparse_arch(f, EmbeddingsConfig(managed_collision=["u"]), device=torch.device("cpu"))
    mcc = arch.mc_ebc._managed_collision_collection
    only_u = KeyedJaggedTensor.from_lengths_sync(keys=["u"], values=RAW, lengths=torch.ones(len(RAW), dtype=torch.long))
    first = mcc(only_u).values()
    again = mcc(only_u).values()
    assert first.min() >= 0 and first.max() < 16
    assert torch.equal(first, again), "the same raw id moved to another row"
    slot = {}
    for raw_id, row in zip(RAW.tolist(), first.tolist(), strict=True):
        assert slot.setdefault(raw_id, row) == row
    assert len(set(slot.values())) == len(slot), "two distinct raw ids share a row (collision)"
    x_BI = pooled_to_model_input(arch(_kjt(RAW)), f)
    assert x_BI.shape == (len(RAW), sparse_dim(f))
    assert torch.equal(x_BI[0, :4], x_BI[3, :4])  # same raw id, same embedding (u comes first: group user)


def test_managed_collision_needs_raw_ids():
    f = _features()
    f.sparse[0].id_mapping = "hash"
    with pytest.raises(ValueError, match="id_mapping"):
        build_sparse_arch(f, EmbeddingsConfig(managed_collision=["u"]), device=torch.device("cpu"))


def _sharded_mc() -> dict:
    rank, ws = dist.get_rank(), dist.get_world_size()
    f = _features()
    emb = EmbeddingsConfig(managed_collision=["u"], optimizer="sgd", lr=0.5)
    dmp, report = shard_sparse_arch(
        build_sparse_arch(f, emb, device=torch.device("meta")), f, emb, device=torch.device("cpu"), world_size=ws
    )
    mine = RAW[rank * 4 : rank * 4 + 4]
    x1 = pooled_to_model_input(dmp(_kjt(mine)), f)
    x1.sum().backward()
    x2 = pooled_to_model_input(dmp(_kjt(mine)), f)
    return {
        "types": {n: t.sharding_type for n, t in report.tables.items()},
        "shape": tuple(x1.shape),
        "finite": bool(torch.isfinite(x1).all()),
        "moved": (x2 - x1).abs().max().item(),
        "same_id_same_row": rank != 0 or bool(torch.equal(x1[0, :4], x1[3, :4])),  # RAW[0] == RAW[3]
    }


def test_managed_collision_shards_row_wise_on_gloo(dist_pool):
    for r in dist_pool.run(_sharded_mc):
        assert r["types"]["u"] == "row_wise"
        assert r["shape"] == (4, 8) and r["finite"]
        assert r["moved"] > 1e-4, "the fused optimizer did not update the managed table"
        assert r["same_id_same_row"]
