"""Small shared fixtures for the embeddings tests: a feature config that exercises every table kind,
deterministic KJT batches, and helpers that read sharded tables back.

Features (config order differs from group order on purpose):

    name  group     table  rows dim max_len  pooling
    c     context   c        32   8   3      mean (table pooled MEAN natively)
    a     user      ta       40   8   1      sum
    sb    sequence  item     24   8   4      mean (shares `item` with b: SUM + division)
    b     item      item     24   8   1      sum
    d     context   d        16   8   1      sum
"""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.config import EmbeddingsConfig
from pipeline.config import FeaturesConfig, SparseFeature


def small_features() -> FeaturesConfig:
    sf = SparseFeature
    return FeaturesConfig(
        dense=[],
        groups=["user", "item", "context", "sequence"],
        sparse=[
            sf(name="c", group="context", vocab_size=32, dim=8, max_len=3),
            sf(name="a", group="user", vocab_size=40, dim=8, table="ta"),
            sf(name="sb", group="sequence", vocab_size=24, dim=8, max_len=4, table="item"),
            sf(name="b", group="item", vocab_size=24, dim=8, table="item"),
            sf(name="d", group="context", vocab_size=16, dim=8),
        ],
    )


def sgd_config(sharding: str = "auto", lr: float = 1.0, **kw) -> EmbeddingsConfig:
    return EmbeddingsConfig(sharding=sharding, optimizer="sgd", lr=lr, **kw)


def make_kjt(features: FeaturesConfig, rows: range, seed: int = 1, total: int = 16, hot: int = 0) -> KeyedJaggedTensor:
    """Rows `rows` of a deterministic batch of `total` rows (keys in config order, like the pipeline).

    Scalars have one id, lists 0..max_len ids (empty bags included). With `hot` > 0 ids are drawn
    from [0, hot) only, so the other rows are never looked up."""
    g = torch.Generator().manual_seed(seed)
    ids: list[list[torch.Tensor]] = []
    for f in features.sparse:
        hi = min(hot, f.vocab_size) if hot else f.vocab_size
        per_row = []
        for _ in range(total):
            n = 1 if f.max_len == 1 else int(torch.randint(0, f.max_len + 1, (1,), generator=g))
            per_row.append(torch.randint(0, hi, (n,), generator=g))
        ids.append(per_row)
    values = [ids[k][r] for k in range(len(features.sparse)) for r in rows]
    lengths = torch.tensor([len(v) for v in values], dtype=torch.int64)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in features.sparse], values=torch.cat(values).long(), lengths=lengths
    )


def local_tables(dmp: torch.nn.Module) -> dict[str, list[tuple[int, int, torch.Tensor]]]:
    """This rank's table shards: name -> [(row0, col0, tensor copy)]."""
    out: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
    for key, value in dmp.state_dict().items():
        parts = key.split(".")
        if parts[-1] != "weight" or parts[-3] != "embedding_bags":
            continue
        shards = out.setdefault(parts[-2], [])
        for sh in value.local_shards():
            r0, c0 = sh.metadata.shard_offsets
            shards.append((r0, c0, sh.tensor.detach().clone()))
    return out


def unsharded_tables(arch: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> full weight of an unsharded SparseArch."""
    out = {}
    for key, value in arch.state_dict().items():
        parts = key.split(".")
        if parts[-1] == "weight" and parts[-3] == "embedding_bags":
            out[parts[-2]] = value.detach().clone()
    return out


def shard_errors(shards: dict[str, list[tuple[int, int, torch.Tensor]]], full: dict[str, torch.Tensor]) -> float:
    """Max |shard - matching slice of the full table| over every local shard."""
    err = 0.0
    for name, items in shards.items():
        for r0, c0, t in items:
            ref = full[name][r0 : r0 + t.shape[0], c0 : c0 + t.shape[1]]
            err = max(err, (t - ref).abs().max().item() if t.numel() else 0.0)
    return err
