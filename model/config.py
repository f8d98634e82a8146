"""Typed config sections for the dense model (`model`) and its per-token sparse MoE (`moe`).

The allowed names live here and the model code dispatches on the same constants (`model.zoo` on
MODEL_NAMES, `model.rankmixer` on MIXINGS, `model.moe` on ROUTERS). No torch import: `--help` is fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schema import ConfigError, check_one_of, check_range

MODEL_NAMES = (
    "rankmixer",
    "rankmixer_shared_ffn",
    "rankmixer_no_mixing",
    "self_attention",
    "dlrm_mlp",
    "dcnv2",
)
"""`model.name`: the zoo (`model.zoo.MODELS` has exactly these keys)."""


@dataclass(frozen=True)
class DenseInputSpec:
    """The shape of a model's dense input (`model.dense_input.DenseInput`), from the [features] section.

    Attributes:
        num_features: F, dense columns (features.dense).
        bucketized: indices of the features fed as bucket embeddings instead of as values.
        num_buckets: equal-frequency buckets per bucketized feature (+ one row for missing values).
        bucket_dim: width of a bucket embedding.
        missing_flags: add one 0/1 "was missing" input per dense feature.
    """

    num_features: int
    bucketized: tuple[int, ...] = ()
    num_buckets: int = 128
    bucket_dim: int = 8
    missing_flags: bool = False


MIXINGS = ("paper", "article")
"""`model.mixing`."""
TOKENIZATIONS = ("slices", "groups")
"""`model.tokenization`."""
FFN_ACTIVATIONS = ("gelu", "geglu")
"""`model.ffn_activation`."""
ROUTERS = ("relu", "topk")
"""`moe.router`."""


@dataclass
class ModelConfig:
    """The dense model: RankMixer or one of the baselines of the zoo."""

    name: str = "rankmixer"
    """One of: rankmixer, rankmixer_shared_ffn, rankmixer_no_mixing, self_attention, dlrm_mlp, dcnv2."""
    num_tokens: int = 8
    """T: tokens per sample (also the number of mixing heads H, since H = T)."""
    d_model: int = 64
    """D: token width; must be divisible by num_tokens."""
    num_layers: int = 2
    """L: RankMixer blocks."""
    ffn_mult: int = 4
    """k: per-token FFN hidden width is k x D."""
    ffn_activation: str = "gelu"
    """RankMixer's dense FFN (per-token, or shared): 'gelu' (the paper, v = W2 GELU(W1 s)) or 'geglu'
    (v = W2 (GELU(W1a s) * W1b s), a gated unit with 1.5x the FFN's parameters and FLOPs: the product of
    two projections of a mixed token multiplies features of different groups). The baselines have no
    such FFN and ignore it (as they ignore ffn_mult); with moe.enabled it must stay 'gelu'."""
    mixing: str = "paper"
    """'paper' (parameter-free multi-head token mixing) or 'article' (linear + GELU per head, then a
    projection, as in the seed article)."""
    tokenization: str = "slices"
    """'slices' (the paper: the concatenated embedding vector cut into T equal slices, which may cross
    feature-group boundaries) or 'groups' (every semantic group of `features.groups`, then the dense
    group, gets whole tokens in proportion to its width, at least one; no token mixes two groups)."""
    shared_projection: bool = False
    """Tokenize with one shared projection instead of one per token."""
    token_pos_emb: bool = False
    """Add a learnable position embedding per token."""
    group_pos_emb: bool = False
    """Add the seed article's learnable intra-group and inter-group position encodings."""
    dense_proj_dim: int = 16
    """Width the dense features are projected to before they join the embedding vector."""
    tower_hidden: list[int] = field(default_factory=lambda: [64])
    """Hidden widths of each task tower."""
    mlp_hidden: list[int] = field(default_factory=lambda: [256, 128])
    """Hidden widths of the DLRM-MLP and DCNv2 deep networks."""
    cross_layers: int = 3
    """DCNv2 cross layers."""
    attn_heads: int = 0
    """Heads of the self-attention baseline; 0 = num_tokens."""
    dropout: float = 0.0
    """Dropout on hidden layers: the towers' and MLPs' hidden layers, RankMixer's per-token FFN hidden layer."""
    token_dropout: float = 0.0
    """Token models (rankmixer*, self_attention): in training, each token of each row is zeroed with this
    probability after tokenization (the others scaled by 1 / (1 - p)), so no single feature group's token
    (a memorised id) can carry a prediction alone. Not used by dlrm_mlp / dcnv2 (a config error there)."""
    batch_norm: bool = False
    """BatchNorm1d on the towers' and MLPs' hidden layers (running statistics averaged over ranks before
    evaluation and checkpoints)."""
    feature_dots: int = 0
    """Token models (rankmixer*, self_attention): 0 = off; C > 0: the tokenizer also reads the pairwise
    dot products of the pooled sparse feature embeddings (DLRM's interaction, ours in RankMixer): the
    I-wide pooled vector is cut into S = I / C features of width C (every features.sparse dim must be C)
    and the S (S - 1) / 2 products <e_i, e_j>, i < j, join the tokenizer input after the dense features.
    Same-table features (a history's genres and the candidate's) then meet as one number, their affinity.
    dlrm_mlp and dcnv2 have no tokenizer and ignore it (as RankMixer ignores mlp_hidden), so one config
    can be run with every model of the zoo."""

    def validate(self) -> None:
        """Names known, sizes positive, D divisible by T (and by the attention heads)."""
        check_one_of(self.name, MODEL_NAMES, "model.name")
        check_one_of(self.mixing, MIXINGS, "model.mixing")
        check_one_of(self.tokenization, TOKENIZATIONS, "model.tokenization")
        check_one_of(self.ffn_activation, FFN_ACTIVATIONS, "model.ffn_activation")
        for name in ("num_tokens", "d_model", "num_layers", "ffn_mult", "dense_proj_dim"):
            check_range(getattr(self, name), f"model.{name}", min=1)
        check_range(self.cross_layers, "model.cross_layers", min=0)
        check_range(self.attn_heads, "model.attn_heads", min=0)
        check_range(self.dropout, "model.dropout", min=0.0, max=1.0, max_open=True)
        check_range(self.token_dropout, "model.token_dropout", min=0.0, max=1.0, max_open=True)
        check_range(self.feature_dots, "model.feature_dots", min=0)
        if self.token_dropout > 0 and self.name in ("dlrm_mlp", "dcnv2"):
            raise ConfigError(
                f"model.token_dropout = {self.token_dropout} needs a token model; {self.name!r} has no tokens"
            )
        if self.d_model % self.num_tokens:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.num_tokens ({self.num_tokens}): "
                "token mixing splits every token into H = T heads"
            )
        if self.attn_heads and self.d_model % self.attn_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.attn_heads ({self.attn_heads})"
            )
        for key in ("tower_hidden", "mlp_hidden"):
            if any(w < 1 for w in getattr(self, key)):
                raise ConfigError(f"model.{key} widths must be >= 1, got {getattr(self, key)}")


@dataclass
class MoEConfig:
    """Per-token sparse mixture of experts replacing each token's FFN."""

    enabled: bool = False
    """Replace the per-token FFN by per-token experts."""
    num_experts: int = 4
    """N_e: experts per token position."""
    expert_mult: int = 1
    """k_e: each expert is D -> k_e x D -> D."""
    router: str = "relu"
    """'relu' (the paper's ReLU routing with adaptive L1) or 'topk' (the seed article's softmax top-k)."""
    top_k: int = 2
    """Experts per token for the top-k router."""
    dtsi: bool = True
    """Dense training, sparse inference: a training router and an inference router."""
    target_activation: float = 0.25
    """Target mean fraction of active experts for the ReLU router's L1 controller."""
    l1_init: float = 1e-4
    """Initial L1 coefficient lambda."""
    l1_step: float = 1.2
    """Controller factor: lambda is multiplied by it when too many experts are active, divided when too few."""
    load_balance: float = 0.0
    """Coefficient of the load-balance term (fraction routed x mean gate probability)."""
    gate_leak: float = 0.0
    """ReLU router: gradient slope below zero in training (the forward stays ReLU), so dead gates can
    reopen; 0 = plain ReLU. Without it the L1 controller can only lower the activation: a router whose
    gates died below the target activation stays there with lambda driven to 0."""

    def validate(self) -> None:
        """Router known, counts positive, the controller's target and step in range."""
        check_one_of(self.router, ROUTERS, "moe.router")
        check_range(self.num_experts, "moe.num_experts", min=1)
        check_range(self.expert_mult, "moe.expert_mult", min=1)
        if self.router == "topk":
            check_range(self.top_k, "moe.top_k", min=1, max=self.num_experts)
        check_range(self.target_activation, "moe.target_activation", min=0.0, max=1.0, min_open=True)
        check_range(self.l1_init, "moe.l1_init", min=0.0)
        check_range(self.l1_step, "moe.l1_step", min=1.0, min_open=True)
        check_range(self.load_balance, "moe.load_balance", min=0.0)
        check_range(self.gate_leak, "moe.gate_leak", min=0.0, max=1.0)
