"""Per-token experts, routers, the L1 controller and DTSI.

Legend: B batch, T tokens, t owned positions, D width, E experts per token, M = k_e D.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import DenseInputSpec, ModelConfig, MoEConfig
from model.moe import PerTokenExperts, PerTokenMoE, moe_layers
from model.output import task_loss
from model.rankmixer import RankMixer

T, B, D, E = 4, 6, 8, 3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(ex: PerTokenExperts, x_tBD: torch.Tensor, g_tBE: torch.Tensor) -> torch.Tensor:
    """Explicit loop: sum_j g_j (W2_j GELU(W1_j x + b1_j) + b2_j) per token position."""
    out = torch.zeros_like(x_tBD)
    for i in range(x_tBD.shape[0]):
        for j in range(ex.num_experts):
            y = F.gelu(x_tBD[i] @ ex.w1[i, j] + ex.b1[i, j]) @ ex.w2[i, j] + ex.b2[i, j]
            out[i] += g_tBE[i, :, j : j + 1] * y
    return out


def test_dense_experts_equal_weighted_sum_with_positive_gates() -> None:
    ex = PerTokenExperts(list(range(T)), E, D, 2, layer=0, seed=0)
    x = torch.randn(T, B, D, generator=_gen(1))
    g = torch.rand(T, B, E, generator=_gen(2)) + 0.1
    torch.testing.assert_close(ex(x, g), _reference(ex, x, g))
    # strided (sample-major storage) views give the same result
    torch.testing.assert_close(ex(x.transpose(0, 1).contiguous().transpose(0, 1), g), _reference(ex, x, g))


def test_sparse_forward_equals_dense_restricted_to_nonzero_gates() -> None:
    ex = PerTokenExperts(list(range(T)), E, D, 2, layer=1, seed=3)
    x = torch.randn(T, B, D, generator=_gen(1))
    g = F.relu(torch.randn(T, B, E, generator=_gen(2)))
    g[1] = 0.0  # a position with no active expert at all
    assert 0 < (g > 0).float().mean() < 1
    torch.testing.assert_close(ex.forward_sparse(x, g), ex(x, g))
    torch.testing.assert_close(ex.forward_sparse(x, g), _reference(ex, x, g))


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("grouped_mm", [True, False])
def test_grouped_sparse_paths_equal_dense_with_the_same_gates(
    sync_free: bool, grouped_mm: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every way of running the grouped sparse forward (static shapes or cut to the active rows; torch's
    grouped GEMM or the padded batched matmul) equals the dense forward to fp32 rounding, with empty
    groups, a position without any active expert, one sample active everywhere and one nowhere."""
    monkeypatch.setattr(PerTokenExperts, "grouped_mm", grouped_mm and hasattr(torch, "_grouped_mm"))
    ex = PerTokenExperts(list(range(T)), E, D, 2, layer=0, seed=5)
    x = torch.randn(T, 40, D, generator=_gen(3))
    g = F.relu(torch.randn(T, 40, E, generator=_gen(4)) - 0.6)
    g[:, 7] = 0.5
    g[:, 9] = 0.0
    g[2] = 0.0
    g[0, :, 1] = 0.0  # group (position 0, expert 1) empty
    assert 0.05 < (g > 0).float().mean() < 0.5
    out = ex.forward_sparse(x, g, sync_free=sync_free)
    torch.testing.assert_close(out, ex(x, g), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.equal(out[:, 9], torch.zeros_like(out[:, 9]))
    zero = ex.forward_sparse(x, torch.zeros_like(g), sync_free=sync_free)
    assert torch.equal(zero, torch.zeros_like(zero))


def test_grouped_sparse_forward_has_no_per_group_loop() -> None:
    """The work does not grow with the number of groups: one sort, two grouped GEMMs, one scatter --
    counted as calls of the grouped GEMM per forward, whatever t x E is."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no grouped GEMM")
    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    ex = PerTokenExperts(list(range(8)), 6, D, 2, layer=0, seed=1)
    g = F.relu(torch.randn(8, 32, 6, generator=_gen(5)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "_grouped_mm", counting)
        ex.forward_sparse(torch.randn(8, 32, D, generator=_gen(6)), g, sync_free=True)
    assert len(calls) == 2


def test_expert_shard_equals_slices_of_full_build() -> None:
    full = PerTokenExperts(list(range(T)), E, D, 2, layer=1, seed=7)
    shard = PerTokenExperts([2, 3], E, D, 2, layer=1, seed=7)
    for name, p in shard.named_parameters():
        assert torch.equal(p, dict(full.named_parameters())[name][2:4]), name
    other_layer = PerTokenExperts([2, 3], E, D, 2, layer=0, seed=7)
    assert not torch.equal(other_layer.w1, shard.w1)
    assert not torch.equal(full.w1[0, 0], full.w1[0, 1])  # experts are not copies of each other


def _moe(**kw: object) -> PerTokenMoE:
    cfg = MoEConfig(enabled=True, num_experts=E, **kw)  # type: ignore[arg-type]
    return PerTokenMoE(T, D, cfg, layer=0, seed=0, gen=_gen())


def test_moe_eval_sparse_equals_eval_dense_and_reg_terms() -> None:
    moe = _moe(l1_init=0.5, load_balance=0.1).eval()
    s = torch.randn(T, B, D, generator=_gen(1))
    y_sparse, reg, stats = moe(s)
    moe.sparse_inference = False
    y_dense, reg2, _ = moe(s)
    torch.testing.assert_close(y_sparse, y_dense)
    g = F.relu(torch.baddbmm(moe.router_infer_b, s, moe.router_infer_w))
    l1 = 0.5 * g.sum(dim=(0, 2)).mean()
    assert float(reg.detach()) > float(l1.detach()) > 0  # load balance adds a positive term
    assert stats["active_T"].shape == (T,) and stats["dead_TE"].shape == (T, E)
    torch.testing.assert_close(stats["active_T"], (g > 0).float().mean(dim=(1, 2)))


def test_topk_router_keeps_k_experts_and_load_balance_has_gradient() -> None:
    moe = _moe(router="topk", top_k=2, load_balance=1.0, dtsi=False).train()
    s = torch.randn(T, B, D, generator=_gen(1))
    _, reg, stats = moe(s)
    torch.testing.assert_close(stats["active_T"], torch.full((T,), 2 / E))
    reg.backward()
    assert moe.router_infer_w.grad is not None and moe.router_infer_w.grad.abs().sum() > 0
    moe.update_l1()  # no-op for top-k
    assert float(moe.l1_lambda) == pytest.approx(MoEConfig().l1_init)


def test_dtsi_inference_router_gets_task_gradient_with_zero_lambda() -> None:
    cfg = ModelConfig(num_tokens=T, d_model=D, num_layers=1, ffn_mult=2, tower_hidden=[8])
    model = RankMixer(
        cfg, MoEConfig(enabled=True, num_experts=E, l1_init=0.0), sparse_dim=12, dense=DenseInputSpec(2), num_tasks=2
    )
    sparse, dense = torch.randn(B, 12, generator=_gen(1)), torch.randn(B, 2, generator=_gen(2))
    labels = (torch.rand(B, 2, generator=_gen(3)) > 0.5).float()
    out = model(sparse, dense)
    assert float(out.reg_loss.detach()) == 0.0
    task_loss(out.logits_BK, labels)[0].backward()
    layer = moe_layers(model)[0]
    assert layer.router_infer_w.grad.abs().sum() > 0, "h_infer must learn from the task loss (DTSI)"
    assert layer.router_train_w.grad.abs().sum() > 0


def test_dtsi_l1_reaches_only_the_inference_router() -> None:
    moe = _moe(l1_init=1.0).train()
    _, reg, _ = moe(torch.randn(T, B, D, generator=_gen(1)))
    reg.backward()
    assert moe.router_infer_w.grad.abs().sum() > 0
    assert moe.router_train_w.grad is None


def test_dtsi_inference_is_the_function_odd_rows_trained_with() -> None:
    cfg = ModelConfig(num_tokens=T, d_model=D, num_layers=2, ffn_mult=2, tower_hidden=[8])
    model = RankMixer(
        cfg, MoEConfig(enabled=True, num_experts=E), sparse_dim=12, dense=DenseInputSpec(2), num_tasks=2, seed=1
    )
    sparse, dense = torch.randn(B, 12, generator=_gen(1)), torch.randn(B, 2, generator=_gen(2))
    train_logits = model.train()(sparse, dense).logits_BK
    eval_logits = model.eval()(sparse, dense).logits_BK  # h_infer routing, sparse experts
    torch.testing.assert_close(eval_logits[1::2], train_logits[1::2])
    assert not torch.allclose(eval_logits[0::2], train_logits[0::2])
    for m in moe_layers(model):
        m.eval_router = "train"
    torch.testing.assert_close(model(sparse, dense).logits_BK[0::2], train_logits[0::2])


@pytest.mark.parametrize("target", [0.15, 0.85])
def test_l1_controller_moves_activation_toward_target(target: float) -> None:
    """Toy problem: fit a random linear map with a ReLU-routed MoE; the controller steers the activation."""
    moe = _moe(target_activation=target, l1_init=1e-3, l1_step=1.5).train()
    opt = torch.optim.Adam(moe.parameters(), lr=0.02)
    g = _gen(5)
    w_DD = torch.randn(D, D, generator=g)
    start = None
    for _ in range(80):
        s = torch.randn(T, 32, D, generator=g)
        y, reg, stats = moe(s)
        loss = F.mse_loss(y, s @ w_DD) + reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        moe.update_l1()
        start = float(stats["active_T"].mean()) if start is None else start
    end = float(moe.train_active)
    assert abs(end - target) < 0.5 * abs(start - target), (start, end, target)


def test_gate_leak_revives_dead_gates_and_lambda_never_underflows() -> None:
    from model.moe import L1_FLOOR, _relu_gates

    x = torch.tensor([[-1.0, 2.0]], requires_grad=True)
    for leak, want in ((0.0, [0.0, 1.0]), (0.1, [0.1, 1.0])):
        g, _ = _relu_gates(x, leak)
        assert g.tolist() == [[0.0, 2.0]]  # the forward stays ReLU
        (grad,) = torch.autograd.grad(g.sum(), x)
        assert grad[0].tolist() == pytest.approx(want)  # a closed gate still gets (a leak of) gradient
    moe = PerTokenMoE(T, D, MoEConfig(enabled=True, num_experts=E, l1_init=1e-3), layer=0, seed=0, gen=_gen())
    for _ in range(200):  # far below the target activation: lambda shrinks, but stops at its floor
        moe.update_l1(active=0.0)
    assert float(moe.l1_lambda) == pytest.approx(1e-3 * L1_FLOOR)
