"""Token mixing, per-token FFN and tokenizer against plain references.

Legend: B batch, T tokens, H heads, D width, c = D / H, I pooled width, F dense features.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.config import DenseInputSpec, ModelConfig
from model.ffn import PerTokenFFN, SharedFFN
from model.mixing import ArticleMixing, SelfAttention, TokenMixing, token_mixing_TBD
from model.tokenizer import Tokenizer, token_layout

T, B, D = 4, 3, 8


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mixing_loop_reference(x_BTD: torch.Tensor, heads: int) -> torch.Tensor:
    """Output token h = concat over input tokens t of head h of token t (B x T x D layout)."""
    Bn, Tn, Dn = x_BTD.shape
    c = Dn // heads
    out = torch.empty(Bn, heads, Tn * c)
    for b in range(Bn):
        for h in range(heads):
            for t in range(Tn):
                out[b, h, t * c : (t + 1) * c] = x_BTD[b, t, h * c : (h + 1) * c]
    return out


def test_token_mixing_matches_loop_and_is_its_own_inverse() -> None:
    x_BTD = torch.randn(B, T, D, generator=_gen())
    y_TBD = token_mixing_TBD(x_BTD.transpose(0, 1), T)
    torch.testing.assert_close(y_TBD.transpose(0, 1), _mixing_loop_reference(x_BTD, T), rtol=0, atol=0)
    # the paper's reshape/transpose formula in B x T x D layout gives the same
    paper = x_BTD.reshape(B, T, T, D // T).transpose(1, 2).reshape(B, T, D)
    torch.testing.assert_close(y_TBD.transpose(0, 1), paper, rtol=0, atol=0)
    torch.testing.assert_close(token_mixing_TBD(y_TBD, T), x_BTD.transpose(0, 1), rtol=0, atol=0)
    assert TokenMixing(T, D)(x_BTD.transpose(0, 1)).shape == (T, B, D)


def test_group_pos_emb_adds_inter_and_intra_encodings() -> None:
    mix = TokenMixing(T, D, group_pos_emb=True)
    with torch.no_grad():
        mix.inter_HD.copy_(torch.randn(T, D, generator=_gen(1)))
        mix.intra_Tc.copy_(torch.randn(T, D // T, generator=_gen(2)))
    x_TBD = torch.randn(T, B, D, generator=_gen())
    delta = mix(x_TBD) - token_mixing_TBD(x_TBD, T)
    c = D // T
    for h in range(T):
        for t in range(T):
            want = mix.inter_HD[h, t * c : (t + 1) * c] + mix.intra_Tc[t]
            torch.testing.assert_close(delta[h, 0, t * c : (t + 1) * c], want.detach())


def test_article_mixing_reference() -> None:
    mix = ArticleMixing(T, D, False, _gen())
    x_TBD = torch.randn(T, B, D, generator=_gen(1))
    y = token_mixing_TBD(x_TBD, T)
    ref = torch.stack([F.gelu(y[h] @ mix.head_w[h] + mix.head_b[h, 0]) for h in range(T)]) @ mix.out_w + mix.out_b
    torch.testing.assert_close(mix(x_TBD), ref)


def test_self_attention_matches_multihead_attention() -> None:
    att = SelfAttention(T, D, 2, _gen())
    mha = nn.MultiheadAttention(D, 2, bias=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(att.qkv_w.T)
        mha.in_proj_bias.copy_(att.qkv_b)
        mha.out_proj.weight.copy_(att.out_w.T)
        mha.out_proj.bias.copy_(att.out_b)
    x_TBD = torch.randn(T, B, D, generator=_gen(1))
    torch.testing.assert_close(att(x_TBD), mha(x_TBD, x_TBD, x_TBD, need_weights=False)[0])


def _outputs_and_input_grads_agree(ffn: nn.Module, refs: nn.ModuleList) -> None:
    """ffn (T x B x D -> T x B x D) against T per-token reference modules: the same outputs, and after one
    backward of a random projection the same input gradients (parameter gradients are left for the caller)."""
    x_TBD = torch.randn(T, B, D, generator=_gen(1), requires_grad=True)
    x_ref = x_TBD.detach().clone().requires_grad_(True)
    y = ffn(x_TBD)
    y_ref = torch.stack([refs[t](x_ref[t]) for t in range(T)])
    torch.testing.assert_close(y, y_ref)
    w_TBD = torch.randn(T, B, D, generator=_gen(2))
    (y * w_TBD).sum().backward()
    (y_ref * w_TBD).sum().backward()
    torch.testing.assert_close(x_TBD.grad, x_ref.grad)


def test_per_token_ffn_equals_separate_linears_outputs_and_gradients() -> None:
    k = 2
    ffn = PerTokenFFN(T, D, k, _gen())
    refs = nn.ModuleList(nn.Sequential(nn.Linear(D, k * D), nn.GELU(), nn.Linear(k * D, D)) for _ in range(T))
    with torch.no_grad():
        for t, ref in enumerate(refs):
            ref[0].weight.copy_(ffn.w1[t].T)
            ref[0].bias.copy_(ffn.b1[t, 0])
            ref[2].weight.copy_(ffn.w2[t].T)
            ref[2].bias.copy_(ffn.b2[t, 0])
    _outputs_and_input_grads_agree(ffn, refs)
    for t, ref in enumerate(refs):
        torch.testing.assert_close(ffn.w1.grad[t], ref[0].weight.grad.T)
        torch.testing.assert_close(ffn.b1.grad[t, 0], ref[0].bias.grad)
        torch.testing.assert_close(ffn.w2.grad[t], ref[2].weight.grad.T)
        torch.testing.assert_close(ffn.b2.grad[t, 0], ref[2].bias.grad)


class _GEGLURef(nn.Module):
    """v = W2 (GELU(W1a s + b1a) * (W1b s + b1b)) + b2 with plain nn.Linear layers (one token)."""

    def __init__(self, d: int, m: int) -> None:
        super().__init__()
        self.value, self.gate, self.out = nn.Linear(d, m), nn.Linear(d, m), nn.Linear(m, d)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.value(s)) * self.gate(s))


def test_per_token_geglu_equals_separate_gated_units_outputs_and_gradients() -> None:
    k = 2
    M = k * D
    ffn = PerTokenFFN(T, D, k, _gen(), activation="geglu")
    assert ffn.w1.shape == (T, D, 2 * M) and ffn.w2.shape == (T, M, D)
    refs = nn.ModuleList(_GEGLURef(D, M) for _ in range(T))
    with torch.no_grad():
        for t, ref in enumerate(refs):
            ref.value.weight.copy_(ffn.w1[t, :, :M].T)
            ref.value.bias.copy_(ffn.b1[t, 0, :M])
            ref.gate.weight.copy_(ffn.w1[t, :, M:].T)
            ref.gate.bias.copy_(ffn.b1[t, 0, M:])
            ref.out.weight.copy_(ffn.w2[t].T)
            ref.out.bias.copy_(ffn.b2[t, 0])
    _outputs_and_input_grads_agree(ffn, refs)
    for t, ref in enumerate(refs):
        torch.testing.assert_close(ffn.w1.grad[t, :, M:], ref.gate.weight.grad.T)
        torch.testing.assert_close(ffn.w1.grad[t, :, :M], ref.value.weight.grad.T)
        torch.testing.assert_close(ffn.b1.grad[t, 0, M:], ref.gate.bias.grad)
        torch.testing.assert_close(ffn.b1.grad[t, 0, :M], ref.value.bias.grad)
        torch.testing.assert_close(ffn.w2.grad[t], ref.out.weight.grad.T)
        torch.testing.assert_close(ffn.b2.grad[t, 0], ref.out.bias.grad)
    assert ffn.flops_per_sample() == 1.5 * PerTokenFFN(T, D, k, _gen()).flops_per_sample()


@pytest.mark.parametrize("cls", [PerTokenFFN, SharedFFN])
def test_unknown_ffn_activation_is_refused(cls: type) -> None:
    with pytest.raises(ValueError, match="swiglu"):
        cls(T, D, 2, _gen(), activation="swiglu")


def test_shared_ffn_applies_the_same_weights_to_every_token() -> None:
    ffn = SharedFFN(T, D, 2, _gen())
    x_TBD = torch.randn(1, B, D, generator=_gen(1)).expand(T, B, D)
    y = ffn(x_TBD)
    for t in range(1, T):
        torch.testing.assert_close(y[t], y[0])
    n_shared = sum(p.numel() for p in ffn.parameters())
    assert T * n_shared == sum(p.numel() for p in PerTokenFFN(T, D, 2, _gen()).parameters())


@pytest.mark.parametrize("shared", [False, True])
def test_tokenizer_slices_and_projects(shared: bool) -> None:
    E, N = 21, 3
    cfg = ModelConfig(num_tokens=T, d_model=D, dense_proj_dim=4, shared_projection=shared)
    tok = Tokenizer(E, DenseInputSpec(N), cfg, _gen())
    sparse, dense = torch.randn(B, E, generator=_gen(1)), torch.randn(B, N, generator=_gen(2))
    e = torch.cat([sparse, dense @ tok.dense_input.proj_w + tok.dense_input.proj_b], 1)
    d = tok.slice_width
    assert d == 7  # ceil((21 + 4) / 4)
    e = F.pad(e, (0, T * d - e.shape[1]))
    ref = torch.stack(
        [
            e[:, t * d : (t + 1) * d] @ tok.proj_w[0 if shared else t] + tok.proj_b[0 if shared else t, 0]
            for t in range(T)
        ],
        1,
    )
    torch.testing.assert_close(tok(sparse, dense), ref)
    with pytest.raises(ValueError, match="sparse_BI"):
        tok(torch.randn(B, E + 1), dense)


def test_token_layout_follows_groups() -> None:
    assert token_layout([128, 128, 96, 48, 16], 8) == [
        (0, 64), (64, 64), (128, 64), (192, 64), (256, 48), (304, 48), (352, 48), (400, 16)
    ]  # fmt: skip
    assert token_layout([10, 0, 5], 2) == [(0, 10), (10, 5)]  # an empty group takes no token
    assert token_layout([7], 3) == [(0, 3), (3, 2), (5, 2)]  # widths differ by at most 1
    with pytest.raises(ValueError, match="model.num_tokens >= the number of groups"):
        token_layout([4, 4, 4], 2)


def test_tokenizer_groups_never_mixes_two_groups() -> None:
    """Group tokens: token t reads only its own group's columns (zero-padded to the widest slice); a change
    in one group moves only that group's tokens. Same projection as the slices mode otherwise."""
    groups, N = (9, 6), 3  # E = 15; dense projected to 4: widths 9, 6, 4 over T = 4 tokens
    E = sum(groups)
    cfg = ModelConfig(num_tokens=T, d_model=D, dense_proj_dim=4, tokenization="groups")
    tok = Tokenizer(E, DenseInputSpec(N), cfg, _gen(), sparse_groups=groups)
    layout = token_layout([*groups, 4], T)
    assert layout == [(0, 5), (5, 4), (9, 6), (15, 4)] and tok.slice_width == 6
    sparse, dense = torch.randn(B, E, generator=_gen(1)), torch.randn(B, N, generator=_gen(2))
    e = torch.cat([sparse, dense @ tok.dense_input.proj_w + tok.dense_input.proj_b], 1)
    ref = torch.stack(
        [F.pad(e[:, a : a + w], (0, 6 - w)) @ tok.proj_w[t] + tok.proj_b[t, 0] for t, (a, w) in enumerate(layout)], 1
    )
    torch.testing.assert_close(tok(sparse, dense), ref)
    moved = sparse.clone()
    moved[:, 9:] += 1.0  # the second group only
    changed = (tok(moved, dense) - tok(sparse, dense)).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="must sum to sparse_dim"):
        Tokenizer(E, DenseInputSpec(N), cfg, _gen(), sparse_groups=(9, 5))


@pytest.mark.parametrize("tokenization", ["slices", "groups"])
def test_tokenizer_feature_dots_match_explicit_pairs(tokenization: str) -> None:
    """model.feature_dots = C: the S (S - 1) / 2 products <e_i, e_j>, i < j, follow the dense input as extra
    columns (a group of their own with 'groups'); outputs and the gradient of sparse_BI equal a reference
    built from explicit pairwise loops."""
    C, S, N = 3, 5, 2  # I = 15: five features of width 3, ten products
    groups = (9, 6)
    cfg = ModelConfig(num_tokens=T, d_model=D, dense_proj_dim=4, feature_dots=C, tokenization=tokenization)
    tok = Tokenizer(S * C, DenseInputSpec(N), cfg, _gen(), sparse_groups=groups)
    sparse = torch.randn(B, S * C, generator=_gen(1), requires_grad=True)
    dense = torch.randn(B, N, generator=_gen(2))
    pairs = [(i, j) for i in range(S) for j in range(i + 1, S)]
    dots = torch.stack([(sparse[:, i * C : (i + 1) * C] * sparse[:, j * C : (j + 1) * C]).sum(1) for i, j in pairs], 1)
    e = torch.cat([sparse, dense @ tok.dense_input.proj_w + tok.dense_input.proj_b, dots], 1)
    assert tok.in_width == S * C + 4 + len(pairs) == e.shape[1]
    if tokenization == "groups":
        layout = token_layout([*groups, 4, len(pairs)], T)
        slices = [F.pad(e[:, a : a + w], (0, tok.slice_width - w)) for a, w in layout]
    else:
        d = tok.slice_width
        e = F.pad(e, (0, T * d - e.shape[1]))
        slices = [e[:, t * d : (t + 1) * d] for t in range(T)]
    ref = torch.stack([x @ tok.proj_w[t] + tok.proj_b[t, 0] for t, x in enumerate(slices)], 1)
    out = tok(sparse, dense)
    torch.testing.assert_close(out, ref)
    weights = torch.randn(out.shape, generator=_gen(3))
    (grad,) = torch.autograd.grad((out * weights).sum(), sparse)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), sparse)
    torch.testing.assert_close(grad, grad_ref)
    with pytest.raises(ValueError, match="at least two sparse features of that width"):
        Tokenizer(14, DenseInputSpec(N), ModelConfig(num_tokens=T, d_model=D, feature_dots=C), _gen())


def test_tokenizer_position_embedding_and_no_dense() -> None:
    cfg = ModelConfig(num_tokens=T, d_model=D, token_pos_emb=True)
    tok = Tokenizer(10, DenseInputSpec(0), cfg, _gen())
    assert tok.pos_TD is not None and tok.pos_TD.shape == (T, D)
    x = tok(torch.randn(B, 10), torch.randn(B, 0))
    assert x.shape == (B, T, D)


@pytest.mark.parametrize("group_pos_emb", [False, True])
def test_fused_mix_residual_equals_mix_plus_residual(group_pos_emb: bool) -> None:
    mix = TokenMixing(T, D, group_pos_emb=group_pos_emb)
    if group_pos_emb:
        with torch.no_grad():
            mix.inter_HD.normal_(generator=_gen(3))
            mix.intra_Tc.normal_(generator=_gen(4))
    x_TBD = torch.randn(T, B, D, generator=_gen(1), requires_grad=True)
    x_ref = x_TBD.detach().clone().requires_grad_(True)
    y, y_ref = mix.mix_residual(x_TBD), mix(x_ref) + x_ref
    torch.testing.assert_close(y, y_ref)
    w = torch.randn(T, B, D, generator=_gen(2))
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x_TBD.grad, x_ref.grad)
