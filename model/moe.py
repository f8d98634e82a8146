"""Per-token sparse mixture of experts with DTSI (dense training, sparse inference).

Token position t owns N_e experts e_{t,j} (each D -> k_e D -> D, GELU) and its own routers; its output
is `v_t = sum_j G_{t,j} e_{t,j}(s_t)`. Expert weights are stacked with the token axis first
(t x N_e x ...) and built for a list of global token positions, so the trainer can shard experts by
position across expert-parallel ranks without touching the model (launch/expert_parallel.py).

Routers (per token, batched like the FFN):
- "relu" (the paper): G = ReLU(h(s)), sparsity from an L1 penalty lambda * sum G whose coefficient is
  steered by a ReMoE-style controller to `moe.target_activation` (`update_l1`, once per optimizer step).
- "topk" (the seed article): softmax over the N_e experts, keep the top_k probabilities (not
  renormalised), zero the rest. No L1 (its sparsity is fixed at top_k / N_e).
An optional load-balance term (`moe.load_balance`) is the usual differentiable surrogate
N_e * sum_j f_j P_j per position (f_j: share of routings to expert j, no gradient; P_j: mean normalised
gate), averaged over positions; it applies to the inference router.

DTSI design (**ours**; the paper does not say how the two routers mix in training). With
`moe.dtsi = true` each position has a training router h_train and an inference router h_infer. In a
training forward pass both routers score every sample, and the gates actually used are chosen by
sample parity: even batch rows route with ReLU(h_train), odd rows with ReLU(h_infer). Why:
- both routers learn from the task loss on every step (half the rows each), so h_infer does not
  collapse under the L1 term it alone carries (the bug of public re-implementations);
- the inference function (h_infer routing, zero-gate experts skipped) is *exactly* the function the odd
  rows were trained with: there is no train/inference mismatch to calibrate away, which is what keeps
  the sparse model close to the dense-trained one at low activation;
- h_train carries no L1, so the even rows keep training the experts densely (experts rarely chosen by
  h_infer still get gradient, the point of DTSI);
- it is deterministic (no random draws), so resume is exact.
The L1 applies to the inference gates of all rows (mean over the batch); the controller measures the
inference router's activation over all rows. In eval, h_infer routes (`eval_router = "train"` scores
the dense-training model with h_train instead, for the DTSI comparison).

Legend: B batch, T tokens (all positions), t owned positions, D width, E experts per token,
M = k_e D expert hidden width, X = E x M.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ROUTERS, MoEConfig
from model.init import uniform_param

L1_FLOOR = 1e-4
"""lambda never falls below l1_init x L1_FLOOR: below the target activation it would otherwise shrink by
l1_step every step towards 0 (underflowing to denormals) and take hundreds of steps to come back."""


def _grouped_mm_flops(a: Tensor, b: Tensor, offs: Tensor | None = None, *args, out_val=None, **kwargs) -> int:
    """FLOPs of `torch._grouped_mm` (torch's FlopCounterMode has no rule for it): the rows it multiplies,
    up to the last group end, times K x N per row; 2 per multiply-add."""
    if a.dim() == 2 and b.dim() == 3:  # rows grouped by offs, one K x N weight per group
        rows = int(offs[-1]) if offs is not None and offs.numel() else a.shape[0]
        return 2 * rows * a.shape[1] * b.shape[2]
    if a.dim() == 3 and b.dim() == 3:  # a plain batched matmul
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 2 * a.shape[0] * a.shape[1] * b.shape[-1]  # 2D x 2D: the K axis grouped


if hasattr(torch.ops.aten, "_grouped_mm"):
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if torch.ops.aten._grouped_mm not in flop_registry:
        register_flop_formula(torch.ops.aten._grouped_mm, get_raw=True)(_grouped_mm_flops)


def expert_seed(seed: int, layer: int, position: int, expert: int) -> int:
    """A process-independent 63-bit seed for expert `expert` of token `position` in block `layer`."""
    digest = hashlib.blake2b(f"{seed}/{layer}/{position}/{expert}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class PerTokenExperts(nn.Module):
    """The experts of the token positions `positions`: w1 t x E x D x M, b1 t x E x M, w2 t x E x M x D, b2 t x E x D.

    Each (layer, position, expert) is initialised from its own generator seeded by
    `expert_seed(seed, layer, position, expert)`, so a shard built for positions [2, 3] is bit-identical
    to positions 2 and 3 of the full build.

    Args:
        positions: the global token positions these experts belong to (t = len(positions)).
        num_experts: E.
        d_model: D.
        expert_mult: k_e (M = k_e D).
        layer: block index (part of the init seed).
        seed: model seed.
    """

    def __init__(
        self, positions: list[int], num_experts: int, d_model: int, expert_mult: int, *, layer: int, seed: int
    ) -> None:
        super().__init__()
        if not positions or num_experts < 1 or d_model < 1 or expert_mult < 1:
            raise ValueError(
                f"model/moe.py: PerTokenExperts needs positions, moe.num_experts, model.d_model and moe.expert_mult "
                f">= 1, got {positions}, {num_experts}, {d_model}, {expert_mult}"
            )
        self.positions = list(positions)
        self.num_experts, self.d_model, self.expert_mult = num_experts, d_model, expert_mult
        self.layer, self.seed = layer, seed
        t, E, D, M = len(positions), num_experts, d_model, expert_mult * d_model
        w1, b1 = torch.empty(t, E, D, M), torch.empty(t, E, M)
        w2, b2 = torch.empty(t, E, M, D), torch.empty(t, E, D)
        for i, pos in enumerate(self.positions):
            for j in range(E):
                gen = torch.Generator().manual_seed(expert_seed(seed, layer, pos, j))
                for p, fan_in in ((w1, D), (b1, D), (w2, M), (b2, M)):
                    p[i, j].uniform_(-(fan_in**-0.5), fan_in**-0.5, generator=gen)
        self.w1, self.b1, self.w2, self.b2 = (nn.Parameter(p) for p in (w1, b1, w2, b2))

    def forward(self, x_tBD: Tensor, gates_tBE: Tensor) -> Tensor:
        """Dense weighted sum over all experts: two batched matmuls over the token axis.

        Args:
            x_tBD: t x B x D states of the owned positions (token-major, as the whole model).
            gates_tBE: t x B x E gates.

        Returns:
            y_tBD: t x B x D = sum_j gates[..., j] * e_j(x).
        """
        g_tBE = gates_tBE.to(x_tBD.dtype)
        t, B, D = x_tBD.shape
        E, M = self.num_experts, self.expert_mult * D
        w1_tDX = self.w1.permute(0, 2, 1, 3).reshape(t, D, E * M)  # small weight copy, big GEMM
        h_tBX = F.gelu(torch.baddbmm(self.b1.view(t, 1, E * M), x_tBD, w1_tDX))
        hg_tBX = (h_tBX.view(t, B, E, M) * g_tBE.unsqueeze(-1)).view(t, B, E * M)
        bias_tBD = torch.bmm(g_tBE, self.b2)  # sum_j g_j b2_j
        return torch.baddbmm(bias_tBD, hg_tBX, self.w2.view(t, E * M, D))

    def forward_sparse(self, x_tBD: Tensor, gates_tBE: Tensor, sync_free: bool | None = None) -> Tensor:
        """Same result as `forward`, computing only the (position, sample, expert) triples with a non-zero gate.

        One stable sort puts the triples in (position, expert) groups, with the inactive ones last;
        the group ends (`offs_G`) are a cumulative count on the device. Both expert layers then run as
        one grouped GEMM over those groups (`torch._grouped_mm`; a padded batched matmul where torch
        lacks it), the biases are gathered per row, and one `index_add_` sums every expert's gated
        output back into its (position, sample) row. No loop over groups, no per-group launch.

        sync_free (default: on CUDA): keep every shape static -- all t x B x E triples stay in the
        buffers, the grouped GEMM stops at the last active row and the inactive rows are masked -- so
        nothing waits on the device. Otherwise (CPU, where reading the active count costs nothing) the
        buffers are cut to the active rows, which also skips their bias, GELU and scatter work.

        Args:
            x_tBD: t x B x D states.
            gates_tBE: t x B x E gates.
            sync_free: see above.

        Returns:
            y_tBD: t x B x D.
        """
        g_tBE = gates_tBE.to(x_tBD.dtype)
        t, B, D = x_tBD.shape
        E, M = self.num_experts, self.expert_mult * x_tBD.shape[-1]
        G = t * E
        if sync_free is None:
            sync_free = x_tBD.is_cuda
        dev = x_tBD.device
        # triple n = (i * B + b) * E + j has group i * E + j when its gate is non-zero, else G (sorted last)
        group_tBE = (torch.arange(t, device=dev).view(t, 1, 1) * E + torch.arange(E, device=dev).view(1, 1, E)).expand(
            t, B, E
        )
        key_N = torch.where(g_tBE != 0, group_tBE, G).flatten()
        key_N, order_N = key_N.sort(stable=True)
        offs_G = torch.bincount(key_N, minlength=G + 1)[:G].cumsum(0)
        if not sync_free:
            n = int(offs_G[-1])
            key_N, order_N = key_N[:n], order_N[:n]
        group_N = key_N.clamp_max(G - 1)
        src_N = torch.div(order_N, E, rounding_mode="floor")  # flat (position, sample) row
        # the GEMM dtype autocast would pick for addmm (grouped GEMM has no autocast rule of its own)
        dt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x_tBD.dtype
        w1, b1, w2, b2 = (p.to(dt) for p in (self.w1, self.b1, self.w2, self.b2))
        x_ND = x_tBD.reshape(t * B, D).index_select(0, src_N).to(dt)
        h_NM = self._grouped(x_ND, w1.reshape(G, D, M), offs_G, group_N)
        h_NM = F.gelu(h_NM + b1.reshape(G, M).index_select(0, group_N))
        y_ND = self._grouped(h_NM, w2.reshape(G, M, D), offs_G, group_N)
        y_ND = (y_ND + b2.reshape(G, D).index_select(0, group_N)) * g_tBE.reshape(-1, 1).index_select(0, order_N)
        if sync_free:  # rows past the last group hold whatever the GEMM left there: never add them
            y_ND = torch.where((key_N < G).unsqueeze(-1), y_ND, 0.0)
        return x_tBD.new_zeros(t * B, D).index_add_(0, src_N, y_ND.to(x_tBD.dtype)).view(t, B, D)

    grouped_mm = hasattr(torch, "_grouped_mm")
    """Whether the grouped GEMM is used (class default: torch has it); False runs the padded batched matmul."""

    def _grouped(self, a_NK: Tensor, w_GKO: Tensor, offs_G: Tensor, group_N: Tensor) -> Tensor:
        """Rows of `a_NK` grouped by `offs_G` (group g: rows offs[g-1]:offs[g]) times their group's
        weight: N x O. Rows past offs[-1] are left undefined (grouped GEMM) or zero (padded path)."""
        if self.grouped_mm and a_NK.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return torch._grouped_mm(a_NK, w_GKO, offs=offs_G.to(torch.int32))
        # padded batched matmul: each group's rows in a G x C x K block, C = the largest group (one read)
        G, N = w_GKO.shape[0], a_NK.shape[0]
        counts_G = torch.diff(offs_G, prepend=offs_G.new_zeros(1))
        starts_G = offs_G - counts_G
        C = max(int(counts_G.max()), 1)
        slot_N = torch.arange(N, device=a_NK.device) - starts_G.index_select(0, group_N)
        live_N = slot_N < C
        flat_N = group_N * C + slot_N.clamp(0, C - 1)
        padded = a_NK.new_zeros(G * C, a_NK.shape[1]).index_put_((flat_N[live_N],), a_NK[live_N])
        out_GCO = torch.bmm(padded.view(G, C, -1), w_GKO)
        return torch.where(live_N.unsqueeze(-1), out_GCO.view(G * C, -1).index_select(0, flat_N), 0.0)


def _relu_gates(logits_TBE: Tensor, leak: float = 0.0) -> tuple[Tensor, Tensor]:
    """ReLU routing. Returns (gates, normalised gates for the load-balance term), both T x B x E.

    `leak` > 0 keeps the forward value ReLU(x) but lets a gradient of slope `leak` through where x < 0,
    so a gate that no sample opens any more (a "dead" expert) still learns and can open again.
    """
    g = F.relu(logits_TBE)
    if leak > 0:
        g = g + leak * (logits_TBE - logits_TBE.detach()) * (logits_TBE < 0)
    return g, g / g.sum(-1, keepdim=True).clamp_min(1e-9)


def _topk_gates(logits_TBE: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Softmax top-k routing. Returns (gates with all but the top k zeroed, softmax probabilities)."""
    probs = logits_TBE.softmax(-1)
    top_v, top_i = probs.topk(k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, top_i, top_v), probs


class PerTokenMoE(nn.Module):
    """Replaces a block's per-token FFN: per-token routers (replicated, all T) + `self.experts`.

    Args:
        num_tokens: T.
        d_model: D.
        cfg: the `moe` config.
        layer: block index (expert init seed).
        seed: model seed.
        gen: generator for the router initialisation.

    Attributes:
        sparse_inference: in eval, skip zero-gate experts (`experts.forward_sparse`); the trainer sets
            it False under expert parallelism.
        sparse_sync_free: `forward_sparse`'s `sync_free` (None: static shapes on CUDA, cut to the active
            rows elsewhere); the device check times both.
        eval_router: "infer" (default) or "train": which router scores in eval (DTSI comparison).
        l1_lambda: buffer, the L1 coefficient (checkpointed with the state_dict).
        last_active: buffer, share of non-zero gates actually used in the last forward (FLOPs counter).
        train_active: buffer, inference-router activation in the last training forward (controller).
    """

    def __init__(
        self, num_tokens: int, d_model: int, cfg: MoEConfig, *, layer: int, seed: int, gen: torch.Generator
    ) -> None:
        super().__init__()
        if cfg.router not in ROUTERS:
            raise ValueError(f"model/moe.py: moe.router must be one of {ROUTERS}, got {cfg.router!r}")
        if cfg.router == "topk" and not 1 <= cfg.top_k <= cfg.num_experts:
            raise ValueError(f"model/moe.py: moe.top_k ({cfg.top_k}) must be in [1, moe.num_experts]")
        T, D, E = num_tokens, d_model, cfg.num_experts
        self.cfg, self.num_tokens, self.d_model, self.layer = cfg, T, D, layer
        self.experts = PerTokenExperts(list(range(T)), E, D, cfg.expert_mult, layer=layer, seed=seed)
        self.router_infer_w = uniform_param((T, D, E), D, gen)
        self.router_infer_b = uniform_param((T, 1, E), D, gen)
        if cfg.dtsi:
            self.router_train_w = uniform_param((T, D, E), D, gen)
            self.router_train_b = uniform_param((T, 1, E), D, gen)
        self.sparse_inference = True
        self.sparse_sync_free: bool | None = None
        self.eval_router = "infer"
        self.register_buffer("l1_lambda", torch.tensor(float(cfg.l1_init)))
        self.register_buffer("last_active", torch.tensor(1.0), persistent=False)
        self.register_buffer("train_active", torch.tensor(-1.0), persistent=False)

    def _gates(self, s_TBD: Tensor, which: str) -> tuple[Tensor, Tensor]:
        w, b = (
            (self.router_infer_w, self.router_infer_b)
            if which == "infer"
            else (self.router_train_w, self.router_train_b)
        )
        logits_TBE = torch.baddbmm(b, s_TBD, w)
        if self.cfg.router == "relu":
            return _relu_gates(logits_TBE, self.cfg.gate_leak if self.training else 0.0)
        return _topk_gates(logits_TBE, self.cfg.top_k)

    def forward(self, s_TBD: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Route and run the experts.

        Args:
            s_TBD: T x B x D token states (token-major).

        Returns:
            (v_TBD, reg_loss, stats): T x B x D outputs; scalar L1 (+ load-balance) loss; detached stats
            "active_T" (T, inference-router activation per position) and "dead_TE" (T x E, 1 = never active).
        """
        T, B, _ = s_TBD.shape
        g_inf_TBE, p_inf_TBE = self._gates(s_TBD, "infer")
        use_train = self.cfg.dtsi and (self.training or self.eval_router == "train")
        if use_train:
            g_tr_TBE, _ = self._gates(s_TBD, "train")
            if self.training:
                odd_1B1 = (torch.arange(B, device=s_TBD.device) % 2 == 1).view(1, B, 1)
                g_TBE = torch.where(odd_1B1, g_inf_TBE, g_tr_TBE)
            else:
                g_TBE = g_tr_TBE
        else:
            g_TBE = g_inf_TBE
        if not self.training and self.sparse_inference:
            v_TBD = self.experts.forward_sparse(s_TBD, g_TBE, self.sparse_sync_free)
        else:
            v_TBD = self.experts(s_TBD, g_TBE)

        routed_TBE = (g_inf_TBE > 0).to(s_TBD.dtype)
        reg = s_TBD.new_zeros(())
        if self.cfg.router == "relu":
            reg = self.l1_lambda * g_inf_TBE.sum(dim=(0, 2)).mean()
        if self.cfg.load_balance > 0:
            f_TE = routed_TBE.sum(1) / routed_TBE.sum(dim=(1, 2)).clamp_min(1.0).unsqueeze(-1)
            balance = self.cfg.num_experts * (f_TE * p_inf_TBE.mean(1)).sum(-1).mean()
            reg = reg + self.cfg.load_balance * balance
        with torch.no_grad():
            active_TE = routed_TBE.mean(1)
            self.last_active.copy_((g_TBE != 0).to(s_TBD.dtype).mean())
            if self.training:
                self.train_active.copy_(active_TE.mean())
        stats = {"active_T": active_TE.mean(-1), "dead_TE": (active_TE == 0).to(s_TBD.dtype)}
        return v_TBD, reg, stats

    @torch.no_grad()
    def update_l1(self, active: float | Tensor | None = None) -> None:
        """ReMoE-style controller: lambda *= l1_step if activation > target, else lambda /= l1_step.

        Call once per optimizer step. No-op for the top-k router and before the first training forward.

        Args:
            active: the measured inference-router activation to steer on; default: this layer's
                `train_active` from the last training forward. Under data parallelism pass the value
                averaged over ranks so every rank keeps the same lambda.
        """
        if self.cfg.router != "relu":
            return
        a = self.train_active if active is None else torch.as_tensor(active, dtype=self.l1_lambda.dtype)
        if float(a) < 0:
            return
        step = self.cfg.l1_step
        self.l1_lambda.mul_(step if float(a) > self.cfg.target_activation else 1.0 / step)
        self.l1_lambda.clamp_(min=self.cfg.l1_init * L1_FLOOR)  # never underflow: recovers within ~50 steps

    def flops_per_sample(self, training: bool = False, activation: float | None = None) -> float:
        """Forward FLOPs per sample: experts at the activated fraction plus the routers.

        Args:
            training: count the training forward (both DTSI routers).
            activation: share of (token, expert) pairs computed; default: `last_active` measured in the
                last forward (1.0 before any forward). Pass 1.0 for the dense training computation.
        """
        T, D, E, k_e = self.num_tokens, self.d_model, self.cfg.num_experts, self.cfg.expert_mult
        a = float(self.last_active) if activation is None else activation
        routers = 2 if self.cfg.dtsi and (training or self.eval_router == "train") else 1
        return a * E * 4.0 * k_e * T * D * D + routers * 2.0 * T * D * E

    def expert_params_global(self) -> int:
        """Parameters of the experts of all T positions (whatever shard `self.experts` holds)."""
        D, E, M = self.d_model, self.cfg.num_experts, self.cfg.expert_mult * self.d_model
        return self.num_tokens * E * (2 * D * M + M + D)


def moe_layers(model: nn.Module) -> list[PerTokenMoE]:
    """All PerTokenMoE layers of `model`, in block order."""
    return [m for m in model.modules() if isinstance(m, PerTokenMoE)]


def train_activation(model: nn.Module) -> list[float]:
    """Per MoE layer, the inference router's activation measured in the last training forward (-1 before any)."""
    return [float(layer.train_active) for layer in moe_layers(model)]


def steer_l1(model: nn.Module, active: list[float]) -> None:
    """One step of every layer's L1 controller towards `moe.target_activation`, on the given activations
    (under data parallelism: the activations averaged over ranks, so lambda stays identical everywhere)."""
    for layer, a in zip(moe_layers(model), active, strict=True):
        layer.update_l1(active=a)
