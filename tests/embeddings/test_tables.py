"""Single-process checks: tables from the config, pooling (mixed SUM/MEAN on a shared table), the
deterministic plan-independent init, regrouping by name, and config errors that name the key."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedTensor

from config import load_config
from embeddings.config import EmbeddingsConfig
from embeddings.regroup import feature_order, group_dims, pooled_to_model_input, sparse_dim
from embeddings.sharding import (
    VERIFIED_SHARDING_TYPES,
    allowed_sharding_types,
    auto_sharding_types,
    fused_params,
    hbm_cap_bytes,
    make_constraints,
)
from embeddings.tables import build_sparse_arch, init_rows_, table_specs
from tests.embeddings.common import make_kjt, small_features, unsharded_tables

CPU = torch.device("cpu")


def test_default_config_tables_share_item_author_category():
    cfg = load_config(["--config", "configs/default.toml"], world_size=2)
    specs = {s.name: s for s in table_specs(cfg.features, cfg.embeddings)}
    assert len(specs) == 22
    assert specs["item"].feature_names == ["i0", "s_item"]
    assert specs["item"].pooling == "sum" and specs["item"].mean_features == ["s_item"]
    assert specs["u0"].pooling == "sum" and specs["u0"].mean_features == []
    assert sparse_dim(cfg.features) == 25 * 16
    assert feature_order(cfg.features)[-3:] == ["s_item", "s_author", "s_cat"]
    assert [d for _, d in group_dims(cfg.features)] == [8 * 16, 8 * 16, 6 * 16, 3 * 16]


def test_pooling_matches_a_per_feature_reference():
    f = small_features()
    arch = build_sparse_arch(f, EmbeddingsConfig(), device=CPU, seed=2)
    weights = unsharded_tables(arch)
    kjt = make_kjt(f, range(16), seed=5, total=16)
    x_BI = pooled_to_model_input(arch(kjt), f)
    by_name = {sf.name: sf for sf in f.sparse}
    ids = kjt.to_dict()
    cols = []
    for name in feature_order(f):
        sf, jt = by_name[name], ids[name]
        rows = []
        for v in jt.to_dense():
            e = weights[sf.table_name][v].sum(0) if len(v) else torch.zeros(sf.dim)
            rows.append(e / max(len(v), 1) if sf.pooling_mode == "mean" else e)
        cols.append(torch.stack(rows))
    assert any(len(v) == 0 for v in ids["sb"].to_dense()), "fixture lost its empty bags"
    torch.testing.assert_close(x_BI, torch.cat(cols, dim=1))


def test_init_is_deterministic_and_plan_independent():
    f = small_features()
    a = unsharded_tables(build_sparse_arch(f, EmbeddingsConfig(), device=CPU, seed=1))
    b = unsharded_tables(build_sparse_arch(f, EmbeddingsConfig(), device=CPU, seed=1))
    c = unsharded_tables(build_sparse_arch(f, EmbeddingsConfig(), device=CPU, seed=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["ta"], c["ta"])
    full = torch.empty(20000, 8)
    init_rows_(full, "big", 20000, 0, 0, 8, seed=3)
    shard = torch.empty(9000, 4)  # rows crossing init blocks, right half of the columns
    init_rows_(shard, "big", 20000, 7000, 4, 8, seed=3)
    assert torch.equal(shard, full[7000:16000, 4:8])
    assert full.abs().max() <= (1 / 20000) ** 0.5


def test_regroup_reads_by_name_not_position():
    f = small_features()
    order = feature_order(f)
    parts = {n: torch.full((2, sf.dim), float(i)) for i, (n, sf) in enumerate((sf.name, sf) for sf in f.sparse)}
    shuffled = list(reversed([sf.name for sf in f.sparse]))
    kt = KeyedTensor.from_tensor_list(shuffled, [parts[n] for n in shuffled])
    x = pooled_to_model_input(kt, f)
    torch.testing.assert_close(x, torch.cat([parts[n] for n in order], dim=1))
    missing = KeyedTensor.from_tensor_list(shuffled[:-1], [parts[n] for n in shuffled[:-1]])
    with pytest.raises(KeyError, match=shuffled[-1]):
        pooled_to_model_input(missing, f)


def test_shared_table_disagreeing_shapes_is_an_error():
    f = small_features()
    f.sparse[3].dim = 16  # b shares `item` with sb
    with pytest.raises(ValueError, match=r"features.sparse\[3\].*table 'item'"):
        table_specs(f, EmbeddingsConfig())


@pytest.mark.parametrize(
    ("emb", "match"),
    [
        (EmbeddingsConfig(sharding="data_parallel"), "embeddings.sharding = 'data_parallel'.*dense kernel"),
        (EmbeddingsConfig(sharding="grid_shard"), "grid"),
        (EmbeddingsConfig(sharding="diagonal"), "embeddings.sharding = 'diagonal'"),
        (EmbeddingsConfig(table_sharding={"nope": "row_wise"}), "embeddings.table_sharding.nope"),
        (EmbeddingsConfig(table_sharding={"item": "data_parallel"}), "embeddings.table_sharding.item"),
    ],
)
def test_bad_sharding_config_names_the_key(emb, match):
    f = small_features()
    with pytest.raises(ValueError, match=match):
        make_constraints(table_specs(f, emb), f, emb, "cpu", 2)


def test_constraints_restrict_auto_and_honour_overrides():
    f = small_features()
    emb = EmbeddingsConfig(table_sharding={"item": "column_wise"})
    cons = make_constraints(table_specs(f, emb), f, emb, "cpu", 2)
    assert cons["ta"].sharding_types == allowed_sharding_types("cpu")
    assert "data_parallel" not in cons["ta"].sharding_types and "grid_shard" not in cons["ta"].sharding_types
    assert cons["item"].sharding_types == ["column_wise"] and cons["item"].min_partition == 4
    assert cons["item"].pooling_factors == [4.0, 1.0]  # sb (max_len 4), b
    assert "grid_shard" in allowed_sharding_types("cuda")
    assert "table_row_wise" not in allowed_sharding_types("cpu", whole_world=False)
    mc = EmbeddingsConfig(managed_collision=["ta"], table_sharding={"ta": "table_wise"})
    f.sparse[1].id_mapping = "raw"
    with pytest.raises(ValueError, match="managed-collision.*row_wise"):
        make_constraints(table_specs(f, mc), f, mc, "cpu", 2)


def test_cuda_plans_verified_types_and_both_kernels():
    """On CUDA 'auto' picks only the types verified against the unsharded reference (never grid_shard,
    which a user may still name), and the planner may put tables that do not fit HBM in UVM caching."""
    f = small_features()
    emb = EmbeddingsConfig(table_sharding={"item": "grid_shard"})
    cons = make_constraints(table_specs(f, emb), f, emb, "cuda", 2)
    assert cons["ta"].sharding_types == auto_sharding_types("cuda") == VERIFIED_SHARDING_TYPES["cuda"]
    assert "grid_shard" not in cons["ta"].sharding_types and cons["item"].sharding_types == ["grid_shard"]
    assert cons["ta"].compute_kernels == ["fused", "fused_uvm_caching"]
    assert make_constraints(table_specs(f, emb := EmbeddingsConfig()), f, emb, "cpu", 2)["ta"].compute_kernels == [
        "fused"
    ]


def test_hbm_cap_from_config_or_device():
    cpu = torch.device("cpu")
    assert hbm_cap_bytes(EmbeddingsConfig(hbm_cap_gb=80), cpu) is None  # CPU: the planner's DDR default
    cuda = torch.device("cuda", 0)
    assert hbm_cap_bytes(EmbeddingsConfig(hbm_cap_gb=1.5), cuda) == 3 * 2**29
    with pytest.raises(Exception, match="embeddings.hbm_cap_gb"):
        EmbeddingsConfig(hbm_cap_gb=-1).validate()


def test_optimizer_config_errors():
    with pytest.raises(ValueError, match="embeddings.optimizer = 'adam' is CUDA-only"):
        fused_params(EmbeddingsConfig(optimizer="adam"), "cpu")
    with pytest.raises(ValueError, match="embeddings.optimizer: 'lamb'"):
        fused_params(EmbeddingsConfig(optimizer="lamb"), "cpu")
    assert fused_params(EmbeddingsConfig(optimizer="adam"), "cuda")["learning_rate"] == 0.05


def test_l2_columns_follow_feature_order_and_defaults():
    from embeddings.regroup import l2_columns
    from pipeline.config import FeaturesConfig, SparseFeature

    f = FeaturesConfig(
        groups=["user", "item"],
        sparse=[
            SparseFeature(name="item", group="item", dim=2, id_mapping="vocab", vocab_size=10),
            SparseFeature(name="age", group="user", dim=3),
            SparseFeature(name="user", group="user", dim=1, id_mapping="vocab", vocab_size=10, l2=0.5),
        ],
    )
    # model order: user group (age, user) then item; per feature its l2, else vocab_l2 (vocab) or l2
    assert l2_columns(f, 0.01, 0.1) == [0.01, 0.01, 0.01, 0.5, 0.1, 0.1]
    f.sparse[2].l2 = -1.0
    assert l2_columns(f, 0.1, 0.1) == 0.1  # one weight for every column: the scalar path
