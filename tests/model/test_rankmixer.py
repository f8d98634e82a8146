"""The zoo models end to end: FLOPs counter, training, sizes, config errors, determinism.

Legend: B batch, I pooled width, F dense features, K tasks, T tokens, D width.
"""

from __future__ import annotations

import pytest
import torch

from config import load_config
from config.job import dense_input_spec
from model.config import DenseInputSpec, ModelConfig, MoEConfig
from model.moe import moe_layers
from model.output import task_loss
from model.rankmixer import RankMixer
from model.zoo import MODELS, build_model
from tests.model.flops_ref import block_params, measured_flops, paper_block_flops, paper_block_params

E, N, K, B = 30, 3, 2, 32


def _cfg(name: str = "rankmixer", **kw: object) -> ModelConfig:
    base: dict[str, object] = dict(
        name=name, num_tokens=4, d_model=16, num_layers=2, ffn_mult=2, dense_proj_dim=4, tower_hidden=[8]
    )
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sparse, dense = torch.randn(B, E, generator=g), torch.randn(B, N, generator=g)
    labels = (sparse[:, :2] + 0.5 * dense[:, :1] > 0).float()  # learnable signal
    return sparse, dense, labels


VARIANTS: dict[str, tuple[ModelConfig, MoEConfig]] = {
    **{name: (_cfg(name), MoEConfig()) for name in MODELS},
    "article_mixing_pos": (_cfg(mixing="article", group_pos_emb=True, token_pos_emb=True), MoEConfig()),
    "shared_projection": (_cfg(shared_projection=True), MoEConfig()),
    "geglu": (_cfg(ffn_activation="geglu"), MoEConfig()),
    "feature_dots": (_cfg(feature_dots=5), MoEConfig()),  # E = 30: six features of width 5
    "shared_ffn_geglu": (_cfg("rankmixer_shared_ffn", ffn_activation="geglu"), MoEConfig()),
    "moe_relu": (_cfg(), MoEConfig(enabled=True, num_experts=3, expert_mult=2)),
    "moe_topk": (_cfg(), MoEConfig(enabled=True, num_experts=3, router="topk", top_k=2)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flops_counter_matches_flop_counter_mode(variant: str) -> None:
    model_cfg, moe_cfg = VARIANTS[variant]
    model = build_model(model_cfg, moe_cfg, sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K)
    sparse, dense, _ = _batch()
    with torch.no_grad():
        model.train()
        measured = measured_flops(lambda: model(sparse, dense)) / B
        # the training forward computes every expert (dense) and, with DTSI, both routers
        kw = {"activation": 1.0} if moe_cfg.enabled else {}
        analytic = model.flops_per_sample(training=True, **kw) / 3
        assert analytic == pytest.approx(measured, rel=0.05)
        if moe_cfg.enabled:  # sparse inference: experts counted at the measured activation
            model.eval()
            measured = measured_flops(lambda: model(sparse, dense)) / B
            assert model.flops_per_sample() == pytest.approx(measured, rel=0.05)
            assert model.flops_per_sample(training=True) == pytest.approx(3 * model.flops_per_sample(), rel=0.05)


def test_dense_blocks_match_the_paper_closed_forms() -> None:
    cfg = _cfg(num_tokens=8, d_model=64, ffn_mult=3)
    model = build_model(cfg, MoEConfig(), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K)
    T, D, k, L = cfg.num_tokens, cfg.d_model, cfg.ffn_mult, cfg.num_layers
    biases_and_norms = L * (T * (k * D + D) + 4 * D)
    assert block_params(model) == paper_block_params(cfg) + biases_and_norms
    block_flops = sum(b.flops_per_sample() for b in model.blocks)
    assert block_flops == paper_block_flops(cfg)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_model_trains_on_a_small_batch(variant: str) -> None:
    model_cfg, moe_cfg = VARIANTS[variant]
    model = build_model(model_cfg, moe_cfg, sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K, seed=1).train()
    sparse, dense, labels = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(sparse, dense)
        loss = task_loss(out.logits_BK, labels)[0]
        opt.zero_grad()
        (loss + out.reg_loss).backward()
        opt.step()
        for layer in moe_layers(model):
            layer.update_l1()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_moe_stats_and_params() -> None:
    moe_cfg = MoEConfig(enabled=True, num_experts=3)
    model = build_model(_cfg(), moe_cfg, sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K)
    sparse, dense, _ = _batch()
    out = model(sparse, dense)
    assert out.stats["moe/active_LT"].shape == (2, 4)
    assert out.stats["moe/l1_lambda"].shape == (2,)
    assert 0.0 <= float(out.stats["moe/dead_experts"]) <= 1.0
    assert not any(v.requires_grad for v in out.stats.values())
    assert out.reg_loss.dim() == 0 and out.reg_loss.requires_grad
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    dense_model = build_model(_cfg(), MoEConfig(), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K)
    assert dense_model(sparse, dense).stats == {}
    assert float(dense_model(sparse, dense).reg_loss) == 0.0


def test_rankmixer_100m_config_is_within_10_percent_of_107m() -> None:
    cfg = load_config(["--config", "configs/rankmixer_100m.toml"])
    sparse_dim = sum(f.dim for f in cfg.features.sparse)
    assert (sparse_dim, len(cfg.features.dense)) == (400, 8)
    model = build_model(
        cfg.model,
        cfg.moe,
        sparse_dim=sparse_dim,
        dense=dense_input_spec(cfg.features),
        num_tasks=len(cfg.features.labels),
    )
    assert model.num_params() == pytest.approx(107e6, rel=0.10)
    assert block_params(model) == pytest.approx(paper_block_params(cfg.model), rel=0.01)  # 2kLTD^2, k = 3


def test_d_model_not_divisible_by_num_tokens_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"model\.d_model.*model\.num_tokens"):
        RankMixer(_cfg(d_model=18), MoEConfig(), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K)
    with pytest.raises(ValueError, match=r"model\.name"):
        build_model(_cfg("nope"), MoEConfig(), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K)


def test_build_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    moe_cfg = MoEConfig(enabled=True, num_experts=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model(_cfg(), moe_cfg, sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model(_cfg(), moe_cfg, sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K, seed=5)
    c = build_model(_cfg(), moe_cfg, sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K, seed=6)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.tokenizer.proj_w, c.tokenizer.proj_w)
    assert "blocks.0.ffn.l1_lambda" in a.state_dict()


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_stay_fp32_under_bf16_autocast(name: str) -> None:
    """The towers' last layer runs outside autocast: logits are fp32 (not bf16-rounded) for the loss and AUC,
    and equal that layer applied in fp32 to the (bf16) hidden activations."""
    model = build_model(_cfg(name), MoEConfig(), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K)
    sparse, dense, _ = _batch()
    captured: list[torch.Tensor] = []
    head = model.towers.towers[0][-1]
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_BK = model(sparse, dense).logits_BK
    handle.remove()
    assert logits_BK.dtype == torch.float32
    torch.testing.assert_close(logits_BK[:, :1], head(captured[0].float()), rtol=0, atol=0)
    assert (logits_BK - logits_BK.bfloat16().float()).abs().max() > 0  # not rounded to bf16


def test_token_dropout_drops_whole_tokens_in_training_only() -> None:
    from schema import ConfigError  # noqa: PLC0415

    cfg = _cfg(token_dropout=0.5, num_layers=1)
    model = build_model(cfg, MoEConfig(), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K, seed=0)
    plain = build_model(_cfg(num_layers=1), MoEConfig(), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K, seed=0)
    sparse, dense, _ = _batch()
    model.eval(), plain.eval()
    assert torch.equal(model(sparse, dense).logits_BK, plain(sparse, dense).logits_BK)  # eval: identity
    seen: list[torch.Tensor] = []
    model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    model.train()
    torch.manual_seed(0)
    model(sparse, dense)
    x_TBD = seen[0]
    tokens = model.tokenizer.forward_TBD(sparse, dense).detach()
    zero_TB = (x_TBD == 0).all(-1)
    assert 0.3 < zero_TB.float().mean() < 0.7  # about half of the (token, row) pairs dropped, whole tokens
    kept = ~zero_TB
    torch.testing.assert_close(x_TBD[kept], 2.0 * tokens[kept])  # the others scaled by 1 / (1 - p)
    with pytest.raises(ConfigError, match="token_dropout"):
        ModelConfig(name="dcnv2", token_dropout=0.1).validate()


def test_feature_dots_config_errors_name_the_key() -> None:
    from schema import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError, match="model.feature_dots"):
        ModelConfig(feature_dots=-1).validate()
    recipe = ["--config", "configs/recsys.toml", "--model.feature_dots", "16"]
    load_config(recipe)  # every feature of the recipe is 16 wide
    load_config([*recipe[:-1], "8", "--model.name", "dcnv2"])  # no tokenizer: ignored
    with pytest.raises(ConfigError, match=r"features.sparse\[0\] \('user_id'\) has dim 16"):
        load_config([*recipe[:-1], "8"])
    with pytest.raises(ConfigError, match="needs at least two features.sparse"):
        load_config(["--config", "configs/adult.toml", "--model.feature_dots", "8", "--features.sparse", "[]"])
