"""RankMixer (Zhu et al., arXiv 2507.15551) and its ablations, in one readable file.

    sparse_BI, dense_BF -> Tokenizer -> x (T tokens of width D)
      -> L x Block:  S  = LN(Mix(X) + X)          Mix: token mixing | article mixing | identity | attention
                     X' = LN(FFN(S) + S)          FFN: per-token FFN | shared FFN | per-token sparse MoE
      -> mean over tokens -> one MLP tower per task -> logits_BK

Notable:
- Activations stay token-major (T x B x D storage) from the tokenizer to the pooling, so every per-token
  matmul is a plain `baddbmm` over the token axis with no transposed copy; token mixing is one
  permute + copy.
- Initialisation draws from a local generator seeded by `seed` (experts from per-expert generators),
  so every rank builds identical weights whatever the expert-parallel size.
- FLOPs are analytic (multiply-add = 2, matmuls only) and match torch's FlopCounterMode.

Legend: B batch, I pooled-embedding width, F dense features, T tokens, D width, K tasks, L layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import MIXINGS, ModelConfig, MoEConfig
from model.ffn import PerTokenFFN, SharedFFN
from model.init import uniform_param
from model.mixing import ArticleMixing, IdentityMixing, SelfAttention, TokenMixing, check_heads
from model.moe import PerTokenMoE, moe_layers
from model.output import ModelOutput
from model.tokenizer import Tokenizer

MIXERS = ("tokens", "identity", "attention")


class Block(nn.Module):
    """One post-norm block: S = LN(Mix(X) + X), X' = LN(FFN(S) + S).

    Args:
        mixer: the token mixer (T x B x D -> T x B x D) with `mix_residual(x) = Mix(x) + x`.
        ffn: PerTokenFFN, SharedFFN or PerTokenMoE.
        d_model: D.
    """

    def __init__(self, mixer: nn.Module, ffn: nn.Module, d_model: int) -> None:
        super().__init__()
        self.mixer, self.ffn = mixer, ffn
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, x_TBD: Tensor) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """x_TBD: T x B x D -> (x'_TBD, MoE reg loss or None, MoE stats)."""
        s_TBD = self.norm1(self.mixer.mix_residual(x_TBD))
        if isinstance(self.ffn, PerTokenMoE):
            v_TBD, reg, stats = self.ffn(s_TBD)
            return self.norm2(v_TBD + s_TBD), reg, stats
        return self.norm2(self.ffn(s_TBD) + s_TBD), None, {}

    def flops_per_sample(self, training: bool = False, activation: float | None = None) -> float:
        ffn = self.ffn
        f = ffn.flops_per_sample(training, activation) if isinstance(ffn, PerTokenMoE) else ffn.flops_per_sample()
        return self.mixer.flops_per_sample() + f


class Towers(nn.Module):
    """One MLP per task: D -> hidden... -> 1 (ReLU between layers).

    Args:
        d_in: input width.
        hidden: hidden widths.
        num_tasks: K.
        gen: generator for the initialisation.
    """

    def __init__(self, d_in: int, hidden: list[int], num_tasks: int, gen: torch.Generator) -> None:
        super().__init__()
        if any(int(h) < 1 for h in hidden):
            raise ValueError(f"model/rankmixer.py: model.tower_hidden must hold positive widths, got {list(hidden)}")
        self.widths = [d_in, *hidden, 1]
        self.towers = nn.ModuleList()
        for _ in range(num_tasks):
            tower = nn.ModuleList()
            for a, b in zip(self.widths[:-1], self.widths[1:]):
                lin = nn.utils.skip_init(nn.Linear, a, b)
                lin.weight, lin.bias = uniform_param((b, a), a, gen), uniform_param((b,), a, gen)
                tower.append(lin)
            self.towers.append(tower)

    def forward(self, h_BD: Tensor) -> Tensor:
        """h_BD: B x D -> logits_BK: B x K."""
        outs = []
        for tower in self.towers:
            z = h_BD
            for i, lin in enumerate(tower):
                z = lin(z) if i == len(tower) - 1 else torch.relu(lin(z))
            outs.append(z)
        return torch.cat(outs, dim=1)

    def flops_per_sample(self) -> float:
        return 2.0 * len(self.towers) * sum(a * b for a, b in zip(self.widths[:-1], self.widths[1:]))


class RankMixer(nn.Module):
    """RankMixer and its ablations behind the zoo interface.

    Args:
        model: the `model` config section.
        moe: the `moe` config section (experts replace the FFN when `moe.enabled`).
        sparse_dim: E, width of the pooled embeddings.
        num_dense: N, raw dense features.
        num_tasks: K.
        seed: initialisation seed.
        mixer: "tokens" (per `model.mixing`), "identity" (no-mixing ablation) or "attention".
        shared_ffn: one FFN shared by all tokens (ablation; ignored when MoE is on).

    Example:
        >>> m = RankMixer(ModelConfig(num_tokens=4, d_model=16), MoEConfig(), sparse_dim=40, num_dense=3, num_tasks=2)
        >>> m(torch.randn(5, 40), torch.randn(5, 3)).logits_BK.shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        model: ModelConfig,
        moe: MoEConfig,
        *,
        sparse_dim: int,
        num_dense: int,
        num_tasks: int,
        seed: int = 0,
        mixer: str = "tokens",
        shared_ffn: bool = False,
    ) -> None:
        super().__init__()
        T, D, L, k = model.num_tokens, model.d_model, model.num_layers, model.ffn_mult
        if min(T, D, L, k) < 1:
            raise ValueError(
                f"model/rankmixer.py: model.num_tokens/d_model/num_layers/ffn_mult must be >= 1, got {T, D, L, k}"
            )
        check_heads(D, T)
        if mixer not in MIXERS:
            raise ValueError(f"model/rankmixer.py: mixer must be one of {MIXERS}, got {mixer!r}")
        if model.mixing not in MIXINGS:
            raise ValueError(f"model/rankmixer.py: model.mixing must be one of {MIXINGS}, got {model.mixing!r}")
        if num_tasks < 1:
            raise ValueError(f"model/rankmixer.py: num_tasks (label columns) must be >= 1, got {num_tasks}")
        gen = torch.Generator().manual_seed(seed)
        self.cfg, self.moe_cfg, self.num_tasks = model, moe, num_tasks
        self.tokenizer = Tokenizer(sparse_dim, num_dense, model, gen)
        blocks = []
        for layer in range(L):
            if mixer == "identity":
                mix: nn.Module = IdentityMixing()
            elif mixer == "attention":
                mix = SelfAttention(T, D, model.attn_heads, gen)
            elif model.mixing == "article":
                mix = ArticleMixing(T, D, model.group_pos_emb, gen)
            else:
                mix = TokenMixing(T, D, model.group_pos_emb)
            if moe.enabled:
                ffn: nn.Module = PerTokenMoE(T, D, moe, layer=layer, seed=seed, gen=gen)
            elif shared_ffn:
                ffn = SharedFFN(T, D, k, gen)
            else:
                ffn = PerTokenFFN(T, D, k, gen)
            blocks.append(Block(mix, ffn, D))
        self.blocks = nn.ModuleList(blocks)
        self.towers = Towers(D, list(model.tower_hidden), num_tasks, gen)

    def forward(self, sparse_BI: Tensor, dense_BF: Tensor) -> ModelOutput:
        """Score a batch.

        Args:
            sparse_BI: B x I pooled embeddings in semantic-group order.
            dense_BF: B x F raw dense features.

        Returns:
            ModelOutput: logits_BK (B x K); reg_loss (scalar: MoE L1 + load balance, 0 without MoE);
            stats (with MoE: "moe/active_LT" L x T, "moe/l1_lambda" L, "moe/dead_experts" scalar).
        """
        x_TBD = self.tokenizer.forward_TBD(sparse_BI, dense_BF)
        reg = x_TBD.new_zeros(())
        active, dead = [], []
        for block in self.blocks:
            x_TBD, block_reg, stats = block(x_TBD)
            if block_reg is not None:
                reg = reg + block_reg
                active.append(stats["active_T"])
                dead.append(stats["dead_TE"])
        logits_BK = self.towers(x_TBD.mean(0))
        out_stats: dict[str, Tensor] = {}
        if active:
            out_stats["moe/active_LT"] = torch.stack(active)
            out_stats["moe/l1_lambda"] = torch.stack([m.l1_lambda for m in moe_layers(self)]).detach().clone()
            out_stats["moe/dead_experts"] = torch.stack(dead).mean()
        return ModelOutput(logits_BK=logits_BK, reg_loss=reg, stats=out_stats)

    def flops_per_sample(self, training: bool = False, activation: float | None = None) -> float:
        """Analytic forward FLOPs per sample (matmuls, multiply-add = 2); training=True gives 3 x forward.

        Args:
            training: count a training step (3 x the training forward).
            activation: MoE share of experts computed; default: measured in the last forward (see
                `PerTokenMoE.flops_per_sample`). Dense FFNs always count in full.
        """
        f = self.tokenizer.flops_per_sample() + self.towers.flops_per_sample()
        f += sum(b.flops_per_sample(training, activation) for b in self.blocks)
        return 3.0 * f if training else f

    def num_params(self) -> int:
        """All dense-model parameters; experts counted for all T positions even if the module holds a shard."""
        n = sum(p.numel() for name, p in self.named_parameters() if ".experts." not in name)
        return n + sum(m.expert_params_global() for m in moe_layers(self))
