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

from model.config import MIXINGS, DenseInputSpec, ModelConfig, MoEConfig
from model.ffn import PerTokenFFN, SharedFFN
from model.mixing import ArticleMixing, IdentityMixing, SelfAttention, TokenMixing, check_heads
from model.mlp import Towers
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


class RankMixer(nn.Module):
    """RankMixer and its ablations behind the zoo interface.

    Args:
        model: the `model` config section.
        moe: the `moe` config section (experts replace the FFN when `moe.enabled`).
        sparse_dim: E, width of the pooled embeddings.
        dense: the dense input's shape (F features, bucketized ones, missing flags).
        num_tasks: K.
        seed: initialisation seed.
        mixer: "tokens" (per `model.mixing`), "identity" (no-mixing ablation) or "attention".
        shared_ffn: one FFN shared by all tokens (ablation; ignored when MoE is on).
        sparse_groups: widths of the semantic groups in the E columns (`model.tokenization = "groups"`).

    Example:
        >>> cfg = ModelConfig(num_tokens=4, d_model=16)
        >>> m = RankMixer(cfg, MoEConfig(), sparse_dim=40, dense=DenseInputSpec(3), num_tasks=2)
        >>> m(torch.randn(5, 40), torch.randn(5, 3)).logits_BK.shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        model: ModelConfig,
        moe: MoEConfig,
        *,
        sparse_dim: int,
        dense: DenseInputSpec,
        num_tasks: int,
        seed: int = 0,
        mixer: str = "tokens",
        shared_ffn: bool = False,
        sparse_groups: tuple[int, ...] = (),
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
        if moe.enabled and model.ffn_activation != "gelu":
            raise ValueError(
                f"model/rankmixer.py: model.ffn_activation = {model.ffn_activation!r} applies to the dense FFN; "
                "with moe.enabled the experts are GELU FFNs (set it to 'gelu')"
            )
        if num_tasks < 1:
            raise ValueError(f"model/rankmixer.py: num_tasks (label columns) must be >= 1, got {num_tasks}")
        gen = torch.Generator().manual_seed(seed)
        self.cfg, self.moe_cfg, self.num_tasks = model, moe, num_tasks
        self.tokenizer = Tokenizer(sparse_dim, dense, model, gen, sparse_groups)
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
                ffn = SharedFFN(T, D, k, gen, dropout=model.dropout, activation=model.ffn_activation)
            else:
                ffn = PerTokenFFN(T, D, k, gen, dropout=model.dropout, activation=model.ffn_activation)
            blocks.append(Block(mix, ffn, D))
        self.blocks = nn.ModuleList(blocks)
        self.towers = Towers(D, list(model.tower_hidden), num_tasks, gen, model.dropout, model.batch_norm)

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
        p = self.cfg.token_dropout
        if self.training and p > 0:  # whole tokens dropped per row (model.token_dropout)
            keep_TB1 = torch.rand(x_TBD.shape[:2] + (1,), device=x_TBD.device) >= p
            x_TBD = x_TBD * keep_TB1.to(x_TBD.dtype) / (1.0 - p)
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
