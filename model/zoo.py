"""The model zoo: the one dict of model names and `build_model`.

    model = build_model(cfg.model, cfg.moe, sparse_dim=400, dense=DenseInputSpec(8), num_tasks=2, seed=0)
    out = model(sparse_BI, dense_BF)          # ModelOutput(logits_BK, reg_loss, stats)
    model.flops_per_sample(training=True)     # analytic FLOPs per sample (multiply-add = 2)
    model.num_params()                        # dense-model parameters, experts counted globally

Every builder takes (model, moe, *, sparse_dim, dense, num_tasks, seed) and initialises from local
generators seeded by `seed` (the global RNG is never drawn from), so every rank builds identical
weights, and expert weights do not depend on the expert-parallel size.

Legend: B batch, I pooled-embedding width, F dense features, K tasks.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from model.baselines import DLRMMLP, DCNv2
from model.config import MODEL_NAMES, DenseInputSpec, ModelConfig, MoEConfig
from model.rankmixer import RankMixer


def _rankmixer(**variant: object) -> Callable[..., nn.Module]:
    def build(
        model: ModelConfig,
        moe: MoEConfig,
        *,
        sparse_dim: int,
        dense: DenseInputSpec,
        num_tasks: int,
        seed: int = 0,
        sparse_groups: tuple[int, ...] = (),
    ) -> nn.Module:
        return RankMixer(
            model,
            moe,
            sparse_dim=sparse_dim,
            dense=dense,
            num_tasks=num_tasks,
            seed=seed,
            sparse_groups=sparse_groups,
            **variant,  # type: ignore[arg-type]
        )

    return build


def _baseline(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    def build(
        model: ModelConfig,
        moe: MoEConfig,
        *,
        sparse_dim: int,
        dense: DenseInputSpec,
        num_tasks: int,
        seed: int = 0,
        sparse_groups: tuple[int, ...] = (),
    ) -> nn.Module:
        del sparse_groups  # the baselines read the concatenated vector whole
        if moe.enabled:
            raise ValueError(f"model/zoo.py: moe.enabled needs a RankMixer model, not model.name = {model.name!r}")
        return cls(model, sparse_dim=sparse_dim, dense=dense, num_tasks=num_tasks, seed=seed)

    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "rankmixer": _rankmixer(),
    "rankmixer_shared_ffn": _rankmixer(shared_ffn=True),
    "rankmixer_no_mixing": _rankmixer(mixer="identity"),
    "self_attention": _rankmixer(mixer="attention"),
    "dlrm_mlp": _baseline(DLRMMLP),
    "dcnv2": _baseline(DCNv2),
}
assert tuple(MODELS) == MODEL_NAMES, "model/zoo.py: MODELS must list exactly model.config.MODEL_NAMES"


def build_model(
    model: ModelConfig,
    moe: MoEConfig,
    *,
    sparse_dim: int,
    dense: DenseInputSpec,
    num_tasks: int,
    seed: int = 0,
    sparse_groups: tuple[int, ...] = (),
) -> nn.Module:
    """Build the zoo model `model.name`.

    Args:
        model: the `model` config section (name picks the entry of MODELS).
        moe: the `moe` config section.
        sparse_dim: E, width of the pooled embeddings concatenated in semantic-group order.
        dense: the dense input's shape (F features, bucketized ones, missing flags).
        num_tasks: K, label columns (one tower each).
        seed: initialisation seed (same weights for the same seed, on every rank).
        sparse_groups: widths of the semantic groups within the E columns, in order (RankMixer's
            `model.tokenization = "groups"`; `embeddings.regroup.sparse_group_widths`).

    Returns:
        An nn.Module: forward(sparse_BI, dense_BF) -> ModelOutput, flops_per_sample(training), num_params().
    """
    if model.name not in MODELS:
        raise ValueError(f"model/zoo.py: config key model.name = {model.name!r}; expected one of: {', '.join(MODELS)}")
    return MODELS[model.name](
        model, moe, sparse_dim=sparse_dim, dense=dense, num_tasks=num_tasks, seed=seed, sparse_groups=sparse_groups
    )
