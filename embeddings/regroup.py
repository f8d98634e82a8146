"""Pooled embeddings -> the model's input vector, by feature NAME in semantic group order.

The pooled KeyedTensor's key order depends on the sharding plan (table-wise gave f0, f2, f1, f3), so
nothing here reads it by position: `KeyedTensor.regroup` picks slices by key.

Legend: B batch, I pooled-embedding width (sum of the sparse features' widths, `sparse_dim`).
"""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedTensor

from pipeline.config import FeaturesConfig


def feature_order(features: FeaturesConfig) -> list[str]:
    """Sparse feature names in model order: `features.groups` order, config order within a group.

    Raises:
        ValueError: a feature's group is not in `features.groups`.
    """
    for i, f in enumerate(features.sparse):
        if f.group not in features.groups:
            raise ValueError(
                f"features.sparse[{i}] (name '{f.name}'): group '{f.group}' is not in features.groups {features.groups}"
            )
    return [f.name for g in features.groups for f in features.sparse if f.group == g]


def sparse_group_widths(features: FeaturesConfig) -> tuple[int, ...]:
    """Width of each semantic group within `pooled_to_model_input`'s columns, in `features.groups` order
    (groups without features left out); the sum is `sparse_dim`."""
    widths = (sum(f.dim for f in features.sparse if f.group == g) for g in features.groups)
    return tuple(w for w in widths if w > 0)


def sparse_dim(features: FeaturesConfig) -> int:
    """E: width of `pooled_to_model_input`'s output (sum of every sparse feature's dim)."""
    return sum(f.dim for f in features.sparse)


def feature_l2(features: FeaturesConfig, l2: float, vocab_l2: float) -> dict[str, float]:
    """The embedding-L2 weight of every sparse feature: its own `l2` when set (>= 0), else `vocab_l2` for
    id_mapping = 'vocab' features and `l2` for the others."""
    return {f.name: (f.l2 if f.l2 >= 0 else vocab_l2 if f.id_mapping == "vocab" else l2) for f in features.sparse}


def l2_columns(features: FeaturesConfig, l2: float, vocab_l2: float) -> list[float] | float:
    """The L2 weight of each column of `pooled_to_model_input` (I values in `feature_order`), or one number
    when every feature has the same weight."""
    weights = feature_l2(features, l2, vocab_l2)
    if len(set(weights.values())) <= 1:
        return next(iter(weights.values()), 0.0)
    by_name = {f.name: f for f in features.sparse}
    return [weights[n] for n in feature_order(features) for _ in range(by_name[n].dim)]


def group_dims(features: FeaturesConfig) -> list[tuple[str, int]]:
    """(group, width) per group in `features.groups` order: the column blocks of the B x I input."""
    return [(g, sum(f.dim for f in features.sparse if f.group == g)) for g in features.groups]


def pooled_to_model_input(kt: KeyedTensor, features: FeaturesConfig) -> torch.Tensor:
    """Regroup pooled embeddings by feature name into one B x I tensor in `feature_order`.

    Args:
        kt: the sparse arch's output (B x dim per feature, any key order; a LazyAwaitable is waited).
        features: the features section.

    Returns:
        x_BI: [feature_order(features)[0] | [1] | ...] concatenated along dim 1.

    Raises:
        KeyError: a configured feature is missing from `kt` (names the feature).
    """
    order = feature_order(features)
    keys = set(kt.keys())
    for name in order:
        if name not in keys:
            raise KeyError(f"pooled embeddings have no key '{name}' (features.sparse); keys: {sorted(keys)}")
    return KeyedTensor.regroup([kt], [order])[0]
