"""Target-aware attention pooling (`pooling = "target_attention"`): the KJT expansion, the pooling
against a closed form computed from the table weights, gradients, the sharded and pipelined lookups
on 2 gloo ranks against the unsharded reference, INT8 serving and the config errors.

Features of `attention_features` (the history shares `item` with its target, as in production):

    name    group     table  rows dim max_len  pooling
    item_id item      item     30   8   1      sum
    u       user      u        20   8   1      sum
    hist    sequence  item     30   8   4      target_attention (target item_id)
    tags    context   tags     16   8   3      mean

Legend: B batch, O positions of a sequence feature (its max_len), C one table's width.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from config import JobConfig
from embeddings.attention import TargetAttention, attention_pool, expand_sequences
from embeddings.config import EmbeddingsConfig
from embeddings.pipelining import finish_lookup, pipelinable, start_lookup
from embeddings.regroup import pooled_to_model_input, sparse_dim
from embeddings.sharding import shard_sparse_arch
from embeddings.tables import build_sparse_arch, table_specs
from pipeline.config import FeaturesConfig, SparseFeature
from schema import ConfigError
from tests.embeddings.common import local_tables, make_kjt, shard_errors, unsharded_tables

CPU = torch.device("cpu")
META = torch.device("meta")
B = 6  # rows per rank
HOT = 12  # ids drawn from [0, HOT): rows >= HOT are never looked up


ATTEND = {"pooling": "target_attention", "target": "item_id"}


def attention_features() -> FeaturesConfig:
    sf = SparseFeature
    return FeaturesConfig(
        dense=[],
        groups=["user", "item", "context", "sequence"],
        sparse=[
            sf(name="item_id", group="item", vocab_size=30, dim=8, table="item"),
            sf(name="u", group="user", vocab_size=20, dim=8),
            sf(name="hist", group="sequence", vocab_size=30, dim=8, max_len=4, table="item", **ATTEND),
            sf(name="tags", group="context", vocab_size=16, dim=8, max_len=3),
        ],
    )


class _Spec:
    def __init__(self, attention: list[TargetAttention]) -> None:
        self.attention = attention


# ------------------------------------------------------------------------------------ expansion


def test_expand_sequences_exact_values_and_lengths() -> None:
    #   a | [1] [2] [3]      h | [4, 9] [] [7, 7, 2]      c | [5] [] [6, 8]
    kjt = KeyedJaggedTensor(
        keys=["a", "h", "c"],
        values=torch.tensor([1, 2, 3, 4, 9, 7, 7, 2, 5, 6, 8]),
        lengths=torch.tensor([1, 1, 1, 2, 0, 3, 1, 0, 2], dtype=torch.int32),
    )
    out = expand_sequences(kjt, [_Spec([TargetAttention("h", "a", 3)])])
    assert out.keys() == ["a", "h#0", "h#1", "h#2", "c"]
    assert out.lengths().dtype == torch.int32 and out.stride() == 3
    got = {k: (v.lengths().tolist(), v.values().tolist()) for k, v in out.to_dict().items()}
    assert got == {
        "a": ([1, 1, 1], [1, 2, 3]),
        "h#0": ([1, 0, 1], [4, 7]),
        "h#1": ([1, 0, 1], [9, 7]),
        "h#2": ([0, 0, 1], [2]),
        "c": ([1, 0, 2], [5, 6, 8]),
    }
    # no attention feature: the very same KJT (the default config's path is unchanged)
    assert expand_sequences(kjt, [_Spec([])]) is kjt
    with pytest.raises(RuntimeError, match="longer than its max_len 2"):
        expand_sequences(kjt, [_Spec([TargetAttention("h", "a", 2)])])


def test_expand_sequences_moves_weights_with_their_ids() -> None:
    kjt = KeyedJaggedTensor(
        keys=["h", "a"],
        values=torch.tensor([4, 9, 7, 1, 2]),
        lengths=torch.tensor([2, 1, 1, 1]),
        weights=torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]),
    )
    out = expand_sequences(kjt, [_Spec([TargetAttention("h", "a", 2)])]).to_dict()
    assert out["h#0"].values().tolist() == [4, 7] and out["h#0"].weights().tolist() == pytest.approx([0.1, 0.3])
    assert out["h#1"].values().tolist() == [9] and out["h#1"].weights().tolist() == pytest.approx([0.2])


# ------------------------------------------------------------------------------------ pooling


def _hand_batch() -> tuple[KeyedJaggedTensor, dict[str, list[list[int]]]]:
    """4 rows: a partial history, an empty one, a full one (with a repeated id), one of length 1.
    Keys in an order unlike the config's; id 29 is only ever a candidate, 13 only in a history."""
    ids = {
        "hist": [[3, 13], [], [5, 6, 7, 5], [8]],
        "u": [[1], [2], [3], [4]],
        "tags": [[1, 2], [], [3], [4, 5, 6]],
        "item_id": [[29], [4], [6], [2]],
    }
    keys = list(ids)
    values = torch.tensor([i for k in keys for row in ids[k] for i in row])
    lengths = torch.tensor([len(row) for k in keys for row in ids[k]], dtype=torch.int32)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths), ids


def _closed_form(w_RC: torch.Tensor, hist: list[list[int]], cand: list[list[int]]) -> torch.Tensor:
    """Plain torch, row by row: softmax over the row's real positions only; zeros for an empty row."""
    rows = []
    for h, c in zip(hist, cand):
        if not h:
            rows.append(torch.zeros(w_RC.shape[1]))
            continue
        k_OC, q_C = w_RC[torch.tensor(h)], w_RC[c[0]]
        w_O = torch.softmax(k_OC @ q_C / math.sqrt(w_RC.shape[1]), dim=0)
        rows.append((w_O.unsqueeze(1) * k_OC).sum(0))
    return torch.stack(rows)


def test_attention_pooling_matches_the_closed_form_and_gradients_reach_both_sides() -> None:
    f = attention_features()
    f.validate()
    arch = build_sparse_arch(f, EmbeddingsConfig(), device=CPU, seed=5)
    spec = {s.name: s for s in arch.specs}["item"]
    assert spec.feature_names == ["item_id", "hist"]  # what the config and the planner constraints name
    assert spec.config().feature_names == ["item_id", "hist#0", "hist#1", "hist#2", "hist#3"]
    kjt, ids = _hand_batch()
    kt = arch(kjt)
    assert sorted(kt.keys()) == sorted(sf.name for sf in f.sparse)  # no position keys leave the arch
    out = kt.to_dict()
    w = arch.ebc.embedding_bags["item"].weight
    w_ref = w.detach().clone().requires_grad_(True)
    ref_BC = _closed_form(w_ref, ids["hist"], ids["item_id"])
    assert (out["hist"] - ref_BC).abs().max().item() < 1e-6
    assert out["hist"][1].abs().max().item() == 0.0  # empty history
    # the other features are as before: mean of tags, candidate row itself
    tags_w = arch.ebc.embedding_bags["tags"].weight
    tags_ref = torch.stack([tags_w[r].mean(0) if r else torch.zeros(8) for r in ids["tags"]])
    assert (out["tags"] - tags_ref).abs().max().item() < 1e-6
    assert torch.equal(out["item_id"], w[torch.tensor([r[0] for r in ids["item_id"]])])
    # gradients: only through the attention output; equal to autograd of the closed form
    coeff_BC = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    (out["hist"] * coeff_BC).sum().backward()
    (ref_BC * coeff_BC).sum().backward()
    g, g_ref = w.grad, w_ref.grad
    assert (g - g_ref).abs().max().item() < 1e-6
    assert g[13].abs().sum() > 0, "a history-only row got no gradient"
    assert g[29].abs().sum() > 0, "a candidate-only row got no gradient (the query is not differentiated)"
    assert g[4].abs().sum() == 0, "the candidate of an empty-history row must get no gradient"
    assert g[20:29].abs().sum() == 0


def test_attention_pool_ignores_whatever_the_padding_holds() -> None:
    g = torch.Generator().manual_seed(4)
    k_BOC, q_BC = torch.randn(3, 5, 4, generator=g), torch.randn(3, 4, generator=g)
    n_B = torch.tensor([2, 0, 5])
    out_BC = attention_pool(k_BOC, q_BC, n_B)
    garbage = k_BOC.clone()
    garbage[0, 2:] = 1e3
    garbage[1] = -7.0
    assert torch.equal(attention_pool(garbage, q_BC, n_B), out_BC)
    assert out_BC[1].abs().max().item() == 0.0
    w_O = torch.softmax(k_BOC[0, :2] @ q_BC[0] / 2.0, dim=0)
    assert torch.allclose(out_BC[0], w_O @ k_BOC[0, :2], atol=1e-6)


def test_attention_weights_follow_the_candidate() -> None:
    """A history id equal to the candidate dominates as the scale grows: the scores see the candidate."""
    f = attention_features()
    arch = build_sparse_arch(f, EmbeddingsConfig(), device=CPU, seed=1)
    with torch.no_grad():
        w = arch.ebc.embedding_bags["item"].weight
        w.copy_(
            torch.nn.functional.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=1) * 20
        )
    kjt = KeyedJaggedTensor(
        keys=["item_id", "u", "hist", "tags"],
        values=torch.tensor([3, 7, 1, 1, 3, 5, 9, 2, 7, 5, 1, 1]),
        lengths=torch.tensor([1, 1, 1, 1, 3, 3, 1, 1], dtype=torch.int32),
    )
    out = arch(kjt).to_dict()["hist"]
    assert (out[0] - w[3]).norm() < 1e-2 * w[3].norm() and (out[1] - w[7]).norm() < 1e-2 * w[7].norm()


# ------------------------------------------------------------------------------------ 2 ranks


def _sharded_attention(sharding: str) -> dict:
    """Sharded (plan `sharding`) vs unsharded: pooled inputs over 2 SGD steps, tables after them, and the
    pipelined lookup (`start_lookup` / `finish_lookup`) of a third DMP against `dmp(kjt)`."""
    rank, ws = dist.get_rank(), dist.get_world_size()
    f = attention_features()
    emb = EmbeddingsConfig(sharding=sharding, optimizer="sgd", lr=1.0)
    dmp, report = shard_sparse_arch(build_sparse_arch(f, emb, device=META, seed=3), f, emb, device=CPU, world_size=ws)
    piped, _ = shard_sparse_arch(build_sparse_arch(f, emb, device=META, seed=3), f, emb, device=CPU, world_size=ws)
    ref = build_sparse_arch(f, emb, device=CPU, seed=3)
    w0 = unsharded_tables(ref)
    coeff = torch.randn(ws * B, sparse_dim(f), generator=torch.Generator().manual_seed(7))
    mine = slice(rank * B, rank * B + B)
    batches = [make_kjt(f, range(mine.start, mine.stop), s + 1, ws * B, HOT) for s in range(3)]
    fwd_err, pipe_err, started = 0.0, 0.0, start_lookup(piped, batches[0])
    for step, kjt in enumerate(batches):
        x = pooled_to_model_input(dmp(kjt), f)
        y = pooled_to_model_input(finish_lookup(piped, started), f)
        if step + 1 < len(batches):
            started = start_lookup(piped, batches[step + 1])  # in flight across this step's update
        x_ref = pooled_to_model_input(ref(make_kjt(f, range(ws * B), step + 1, ws * B, HOT)), f)
        fwd_err = max(fwd_err, (x - x_ref[mine]).abs().max().item())
        pipe_err = max(pipe_err, (x - y).abs().max().item())
        (x * coeff[mine]).sum().div(B).backward()
        (y * coeff[mine]).sum().div(B).backward()
        (x_ref * coeff).sum().div(ws * B).backward()
        with torch.no_grad():
            for bag in ref.ebc.embedding_bags.values():
                bag.weight -= 1.0 * bag.weight.grad
                bag.weight.grad = None
    after = local_tables(dmp)
    return {
        "types": {n: t.sharding_type for n, t in report.tables.items()},
        "pipelinable": pipelinable(piped),
        "fwd_err": fwd_err,
        "pipe_err": pipe_err,
        "step_err": shard_errors(after, unsharded_tables(ref)),
        "pipe_table_err": max(
            abs(a[2] - b[2]).max().item() if a[2].numel() else 0.0
            for n in after
            for a, b in zip(after[n], local_tables(piped)[n])
        ),
        "moved": shard_errors(after, w0),
    }


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "auto"])
def test_sharded_and_pipelined_attention_equal_the_unsharded_reference(dist_pool, sharding) -> None:
    for rank, r in enumerate(dist_pool.run(_sharded_attention, sharding)):
        where = f"{sharding} rank {rank}"
        if sharding != "auto":
            assert set(r["types"].values()) == {sharding}, where
        assert r["pipelinable"], where
        assert r["fwd_err"] < 1e-5, f"{where}: pooled inputs differ from the reference by {r['fwd_err']}"
        assert r["pipe_err"] == 0.0, f"{where}: start_lookup/finish_lookup differ from dmp(kjt) by {r['pipe_err']}"
        assert r["step_err"] < 1e-5, f"{where}: tables after 3 fused SGD steps differ by {r['step_err']}"
        assert r["pipe_table_err"] == 0.0, where
        assert r["moved"] > 1e-3, f"{where}: nothing was updated"


# ------------------------------------------------------------------------------------ serving


def test_int8_serving_expands_and_pools_like_fp32() -> None:
    from serving.model import build_sparse, quantize_table

    cfg = JobConfig()
    cfg.features = attention_features()
    train_arch = build_sparse_arch(cfg.features, cfg.embeddings, device=CPU, seed=2)
    tables = unsharded_tables(train_arch)
    fp32 = build_sparse(cfg, tables=tables)
    int8 = build_sparse(cfg, quantized={n: quantize_table(t) for n, t in tables.items()})
    kjt, ids = _hand_batch()
    want = _closed_form(tables["item"], ids["hist"], ids["item_id"])
    x32, x8 = fp32(kjt).to_dict(), int8(kjt).to_dict()
    assert set(x8) == set(x32) == {"item_id", "u", "hist", "tags"}
    assert (x32["hist"] - want).abs().max().item() < 1e-6
    step = max((t.max(1).values - t.min(1).values).max().item() for t in tables.values()) / 255
    assert 0 < (x8["hist"] - want).abs().max().item() <= 2 * step  # really int8 rows, and close
    assert x8["hist"][1].abs().max().item() == 0.0


# ------------------------------------------------------------------------------------ config


def _with(**hist) -> FeaturesConfig:
    f = attention_features()
    for k, v in hist.items():
        setattr(f.sparse[2], k, v)
    return f


@pytest.mark.parametrize(
    "change, match",
    [
        ({"max_len": 1}, r"features\.sparse\[2\]\.max_len' = 1: pooling = 'target_attention' needs a list"),
        ({"target": ""}, r"features\.sparse\[2\]\.target' is empty"),
        ({"target": "hist"}, r"features\.sparse\[2\]\.target' = 'hist': a feature cannot attend to itself"),
        ({"target": "nope"}, r"features\.sparse\[2\]\.target' = 'nope' is not a feature"),
        ({"target": "tags"}, r"features\.sparse\[2\]\.target' = 'tags' has max_len 3, dim 8"),
        ({"pooling": "mean"}, r"features\.sparse\[2\]\.target' = 'item_id' is set but .*pooling is 'mean'"),
        ({"pooling": "", "max_len": 4}, r"features\.sparse\[2\]\.target' .* is set"),
    ],
)
def test_config_errors_name_the_key(change, match) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        _with(**change).validate()
    assert "\n" not in str(e.value)


def test_target_of_another_dim_and_managed_tables_are_refused() -> None:
    f = attention_features()
    f.sparse[1].dim = 4  # u: a scalar feature of another width
    f.sparse[2].target = "u"
    with pytest.raises(
        ConfigError, match=r"features\.sparse\[2\]\.target' = 'u' has max_len 1, dim 4; expected .* dim 8"
    ):
        f.validate()
    with pytest.raises(ValueError, match="feature 'hist': target = 'u' must name another scalar feature .* of dim 8"):
        table_specs(f, EmbeddingsConfig())
    f = attention_features()
    for sf in f.sparse:
        sf.id_mapping = "raw"
    with pytest.raises(ValueError, match="feature 'hist': pooling = \"target_attention\" is not supported on managed"):
        table_specs(f, EmbeddingsConfig(managed_collision=["item"]))
