"""Tests of the DLRM-MLP and DCNv2 baselines (model/baselines.py).

Legend: B batch, I pooled-embedding width, F dense features, Z model input width, K tasks.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.baselines import DLRMMLP, CrossLayer, DCNv2
from model.config import DenseInputSpec, ModelConfig
from model.output import ModelOutput, task_loss

E, N, K, B = 24, 5, 2, 64


def _cfg(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(dense_proj_dim=8, tower_hidden=[16], mlp_hidden=[32, 16], cross_layers=2)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def _build(kind: str, seed: int = 0, **cfg: object) -> torch.nn.Module:
    if kind == "dlrm_mlp":
        return DLRMMLP(_cfg(**cfg), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K, seed=seed)
    if kind == "dcnv2":
        return DCNv2(_cfg(**cfg), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K, seed=seed)
    return DCNv2(_cfg(**cfg), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K, seed=seed, structure="parallel")


KINDS = ["dlrm_mlp", "dcnv2", "dcnv2_parallel"]


def _inputs(b: int = B, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, E, generator=g), torch.randn(b, N, generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_output_shapes_and_interface(kind: str) -> None:
    model = _build(kind)
    sparse_BI, dense_BF = _inputs()
    out = model(sparse_BI, dense_BF)
    assert isinstance(out, ModelOutput)
    assert out.logits_BK.shape == (B, K)
    assert out.reg_loss.shape == () and float(out.reg_loss) == 0.0
    assert out.stats == {}
    assert model.num_params() == sum(p.numel() for p in model.parameters()) > 0
    assert model.flops_per_sample(training=True) == pytest.approx(3 * model.flops_per_sample())


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_in_seed_and_leaves_global_rng_alone(kind: str) -> None:
    state = torch.get_rng_state()
    a, b, c = _build(kind, seed=3), _build(kind, seed=3), _build(kind, seed=4)
    assert torch.equal(torch.get_rng_state(), state), "building a model must not draw from the global RNG"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    x = _inputs()
    assert torch.equal(a(*x).logits_BK, b(*x).logits_BK)


@pytest.mark.parametrize("kind", KINDS)
def test_flops_counter_matches_flop_counter_mode(kind: str) -> None:
    model = _build(kind, mlp_hidden=[48, 24], tower_hidden=[12, 6], cross_layers=3)
    sparse_BI, dense_BF = _inputs()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(sparse_BI, dense_BF)
    measured = counter.get_total_flops() / B
    assert measured > 0
    assert abs(model.flops_per_sample() - measured) / measured < 0.05


def test_dcnv2_cross_term_flops_are_counted() -> None:
    """Cross layers are I x I GEMMs: each added layer adds 2 I^2 FLOPs per sample."""
    f2 = _build("dcnv2", cross_layers=2).flops_per_sample()
    f3 = _build("dcnv2", cross_layers=3).flops_per_sample()
    i = E + 8
    assert f3 - f2 == pytest.approx(2 * i * i)


def test_cross_layer_matches_reference_formula() -> None:
    """x_{l+1} = x0 * (W x_l + b) + x_l, per layer and through the stacked cross network."""
    model = _build("dcnv2", cross_layers=3)
    assert isinstance(model, DCNv2)
    g = torch.Generator().manual_seed(7)
    i = model.input_dim
    x0_BZ = torch.randn(B, i, generator=g)
    xl_BZ = torch.randn(B, i, generator=g)
    layer = model.body.cross[0]
    assert isinstance(layer, CrossLayer)
    w, b = layer.linear.weight, layer.linear.bias
    expected = x0_BZ * (xl_BZ @ w.T + b) + xl_BZ
    torch.testing.assert_close(layer(x0_BZ, xl_BZ), expected)
    # elementwise form, one sample, one coordinate: written out as sums
    j = 3
    manual = x0_BZ[0, j] * (sum(w[j, k] * xl_BZ[0, k] for k in range(i)) + b[j]) + xl_BZ[0, j]
    torch.testing.assert_close(layer(x0_BZ, xl_BZ)[0, j], manual)
    # the network composes the layers with the same x0
    x = x0_BZ
    for lay in model.body.cross:
        x = x0_BZ * (x @ lay.linear.weight.T + lay.linear.bias) + x
    torch.testing.assert_close(model.body.cross_network(x0_BZ), x)


def test_dcnv2_structures_route_inputs() -> None:
    """Stacked feeds the cross output to the MLP; parallel concatenates cross(x0) and MLP(x0)."""
    sparse_BI, dense_BF = _inputs()
    stacked = _build("dcnv2")
    x0 = stacked._inputs(sparse_BI, dense_BF)
    torch.testing.assert_close(stacked.body(x0), stacked.body.mlp(stacked.body.cross_network(x0)))
    par = _build("dcnv2_parallel")
    x0 = par._inputs(sparse_BI, dense_BF)
    h = par.body(x0)
    assert h.shape == (B, par.input_dim + 16)
    torch.testing.assert_close(h, torch.cat([par.body.cross_network(x0), par.body.mlp(x0)], dim=1))


def _planted_batch(b: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels that depend on feature interactions only (no single feature is predictive)."""
    g = torch.Generator().manual_seed(11)
    sparse_BI = torch.randn(b, E, generator=g)
    dense_BF = torch.randn(b, N, generator=g)
    click_B = (sparse_BI[:, 0] * sparse_BI[:, 1] > 0).float()
    finish_B = (sparse_BI[:, 2] * dense_BF[:, 0] > 0).float()
    return sparse_BI, dense_BF, torch.stack([click_B, finish_B], dim=1)


@pytest.mark.parametrize("kind", KINDS)
def test_trains_on_planted_interaction(kind: str) -> None:
    torch.manual_seed(0)
    model = _build(kind)
    sparse_BI, dense_BF, labels_BK = _planted_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        out = model(sparse_BI, dense_BF)
        loss, _ = task_loss(out.logits_BK, labels_BK)
        loss = loss + out.reg_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # chance level is K * ln 2 = 1.386; learning the interactions must take the loss well below it
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])


def test_no_dense_features() -> None:
    model = DLRMMLP(_cfg(), sparse_dim=E, dense=DenseInputSpec(0), num_tasks=K)
    assert model.dense_input is None
    assert model(torch.randn(4, E), torch.zeros(4, 0)).logits_BK.shape == (4, K)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: DLRMMLP(_cfg(mlp_hidden=[32, 0]), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K),
            "model.mlp_hidden",
        ),
        (
            lambda: DLRMMLP(_cfg(tower_hidden=[-1]), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K),
            "model.tower_hidden",
        ),
        (
            lambda: DCNv2(_cfg(cross_layers=-1), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K),
            "model.cross_layers",
        ),
        (lambda: DCNv2(_cfg(), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K, structure="x"), "structure"),
        (lambda: DCNv2(_cfg(), sparse_dim=0, dense=DenseInputSpec(N), num_tasks=K), "sparse_dim"),
        (lambda: DCNv2(_cfg(), sparse_dim=E, dense=DenseInputSpec(N), num_tasks=0), "num_tasks"),
    ],
)
def test_bad_config_names_the_key(build: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_shapes_raise(kind: str) -> None:
    model = _build(kind)
    with pytest.raises(ValueError, match="sparse_BI"):
        model(torch.randn(4, E + 1), torch.randn(4, N))
    with pytest.raises(ValueError, match="dense_BF"):
        model(torch.randn(4, E), torch.randn(4, N + 1))


def test_dropout_and_batch_norm_on_hidden_layers_only() -> None:
    from model.mlp import Towers

    cfg = _cfg(mlp_hidden=[16, 8], tower_hidden=[4], dropout=0.5, batch_norm=True)
    model = DLRMMLP(cfg, sparse_dim=E, dense=DenseInputSpec(N), num_tasks=K)
    kinds = [type(m).__name__ for m in model.body]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout"]
    tower = model.towers.towers[0]
    assert [type(m).__name__ for m in tower] == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    x, d = torch.randn(32, E), torch.randn(32, N)
    model.train()
    assert not torch.equal(model(x, d).logits_BK, model(x, d).logits_BK)  # dropout draws anew
    model.eval()
    assert torch.equal(model(x, d).logits_BK, model(x, d).logits_BK)
    assert isinstance(model.towers, Towers)
