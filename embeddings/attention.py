"""Target-aware (DIN-style) attention pooling of a sequence feature against the candidate item.

    [[features.sparse]]
    name = "hist_items"
    group = "sequence"
    max_len = 20
    table = "item"                  # shared with its target, the usual case (only the same dim is required)
    pooling = "target_attention"
    target = "item_id"              # a scalar feature: the candidate item

An EmbeddingBagCollection pools a bag into one vector, so per-position embeddings come from expanding
the feature's KJT key, before the lookup, into O keys `hist_items#0 .. hist_items#{O-1}` (O = max_len):
key j holds every row's j-th id (0-based, in bag order) as a bag of one, or an empty bag. They are
SUM-pooled lookups of the same table (TorchRec sees O scalar features on it), so tables, sharding,
the fused optimizer, checkpoints, INT8 serving and the pipelined lookup stay TorchRec's, unchanged:

    feature       | row 0      | row 1 | row 2        feature         | row 0 | row 1 | row 2
    hist_items    | [4, 9]     | []    | [7, 7, 2]    hist_items#0    | [4]   | []    | [7]
    item_id       | [3]        | [5]   | [1]     ->   hist_items#1    | [9]   | []    | [7]
                                                      hist_items#2    | []    | []    | [2]
                                                      item_id         | [3]   | [5]   | [1]

After the lookup `attention_pool` turns the O slices k_BOC into one vector per row, with q_BC the
pooled embedding of the `target` feature (a scalar feature of the same width) and n_B the row's
history length (the ORIGINAL KJT's lengths are the mask):

    w_BO   = softmax over j < n_b of <k_BjC, q_BC> / sqrt(C)     (padding positions get weight 0)
    out_BC = sum_j w_Bj k_BjC                                   (an empty history gives zeros)

The scorer has no parameters; gradients reach the table rows of the history ids and of the candidate.

Legend: B batch, O positions of a sequence feature (its max_len), C one table's width, S sparse
features (KJT keys).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

POSITION_SEP = "#"
"""`<feature>#<j>`: the KJT key of position j of an attention feature. Not '@': TorchRec names a feature
shared by several tables `<feature>@<table>` and splits embedding names at '@' (the sharded EBC's
mean-pooling callback then looked up 'hist', not 'hist@0'). `table_specs` refuses a feature named like
a position key."""


@dataclass(frozen=True)
class TargetAttention:
    """One feature pooled with `pooling = "target_attention"`.

    Args:
        feature: the sequence feature (a list column, max_len > 1).
        target: the scalar feature whose pooled embedding is the query (same width).
        max_len: O, the positions looked up (the pipeline truncates bags to max_len ids).
    """

    feature: str
    target: str
    max_len: int

    def position_keys(self) -> list[str]:
        """The O KJT keys the feature is expanded into, in position order."""
        return [position_key(self.feature, j) for j in range(self.max_len)]


class _HasAttention(Protocol):
    attention: list[TargetAttention]


def position_key(feature: str, j: int) -> str:
    """KJT key of position j (0-based) of attention feature `feature`."""
    return f"{feature}{POSITION_SEP}{j}"


def expand_sequences(kjt: KeyedJaggedTensor, specs: Iterable[_HasAttention]) -> KeyedJaggedTensor:
    """Expand every attention feature's key into its O position keys; other keys are untouched.

    Args:
        kjt: the batch (keys = feature names, any order, one stride B; lengths int32 or int64).
        specs: the `TableSpec`s (their `attention` lists name the features to expand).

    Returns:
        The same `kjt` object when no spec has an attention feature; else a KJT whose keys are the
        input's with each attention feature replaced, in place, by `<name>#0 .. <name>#{O-1}`: key j has,
        per row, a bag with the row's j-th id or an empty one. Weights, if any, move with their ids.

    Tensor ops only (no `.item()`, no loop over rows): every id's destination is computed on the
    device and the ids are scattered there, so a CUDA batch is not synchronised. Bags longer than O
    (never from the pipeline, which truncates to max_len) fail an async device assert.

    Raises:
        KeyError: an attention feature is not a key of `kjt` (names it).
    """
    seqs = {a.feature: a.max_len for s in specs for a in s.attention}
    if not seqs:
        return kjt
    keys = kjt.keys()
    for name in seqs:
        if name not in keys:
            raise KeyError(
                f"expand_sequences: the batch has no key '{name}' (a target_attention feature); keys: {keys}"
            )
    S, B = len(keys), kjt.stride()
    lengths = kjt.lengths()
    lengths_SB = lengths.view(S, B)
    values = kjt.values()
    dev = lengths.device
    new_keys: list[str] = []
    new_lengths: list[torch.Tensor] = []  # blocks of rows x B, in new key order
    base_SB: list[torch.Tensor] = []  # per (key, row): first new key of the key, times B
    seq_SB: list[torch.Tensor] = []  # per (key, row): the key is expanded
    for s, k in enumerate(keys):
        base_SB.append(torch.full((B,), len(new_keys) * B, dtype=torch.int64, device=dev))
        seq_SB.append(torch.full((B,), k in seqs, dtype=torch.bool, device=dev))
        if k in seqs:
            max_len = seqs[k]
            torch._assert_async(
                (lengths_SB[s] <= max_len).all(),
                f"expand_sequences: a bag of '{k}' is longer than its max_len {max_len}",
            )
            j_O = torch.arange(max_len, dtype=lengths.dtype, device=dev)
            new_lengths.append((lengths_SB[s].unsqueeze(0) > j_O.unsqueeze(1)).to(lengths.dtype))  # O x B
            new_keys.extend(position_key(k, j) for j in range(max_len))
        else:
            new_lengths.append(lengths_SB[s : s + 1])
            new_keys.append(k)
    out_lengths = torch.cat(new_lengths).view(-1)

    # Every id: its (key, row) segment and position in the bag, then where it lands in the new layout.
    n = values.numel()  # a shape: known on the host without a sync
    len64 = lengths.long()
    seg = torch.repeat_interleave(torch.arange(S * B, device=dev), len64, output_size=n)
    pos = torch.arange(n, device=dev) - (torch.cumsum(len64, 0) - len64)[seg]
    is_seq = torch.cat(seq_SB)[seg]
    new_seg = torch.cat(base_SB)[seg] + seg % B + torch.where(is_seq, pos * B, 0)
    out64 = out_lengths.long()
    dest = (torch.cumsum(out64, 0) - out64)[new_seg] + torch.where(is_seq, 0, pos)
    out_values = torch.empty_like(values).index_copy_(0, dest, values)
    weights = kjt.weights_or_none()
    out_weights = None if weights is None else torch.empty_like(weights).index_copy_(0, dest, weights)
    return KeyedJaggedTensor(keys=new_keys, values=out_values, lengths=out_lengths, weights=out_weights, stride=B)


def attention_pool(k_BOC: torch.Tensor, q_BC: torch.Tensor, n_B: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of each row's history against its candidate, padding masked.

    Args:
        k_BOC: per-position embeddings (positions j >= n_b are padding; their values are ignored).
        q_BC: the candidate's pooled embedding.
        n_B: history lengths (clamped to O).

    Returns:
        out_BC = sum_j w_Bj k_BjC with w_B = softmax over the real positions of <k_Bj, q_B> / sqrt(C);
        zeros for a row with no history.
    """
    positions, C = k_BOC.shape[1], k_BOC.shape[2]
    mask_BO = torch.arange(positions, device=n_B.device).unsqueeze(0) < n_B.unsqueeze(1)
    scores_BO = torch.bmm(k_BOC, q_BC.unsqueeze(2)).squeeze(2) / math.sqrt(C)
    # finfo.min, not -inf: a row with no real position gets a finite uniform softmax, zeroed by the mask
    scores_BO = scores_BO.masked_fill(~mask_BO, torch.finfo(scores_BO.dtype).min)
    w_BO = torch.softmax(scores_BO, dim=1) * mask_BO
    return torch.bmm(w_BO.unsqueeze(1), k_BOC).squeeze(1)


def pool_attention(
    pooled: dict[str, torch.Tensor], kjt: KeyedJaggedTensor, attention: list[TargetAttention]
) -> dict[str, torch.Tensor]:
    """Replace every attention feature's O position slices by its attention-pooled vector.

    Args:
        pooled: {KJT key of the expanded batch: B x C pooled slice}, any order (read by name only).
        kjt: the ORIGINAL (unexpanded) batch: its lengths are the mask.
        attention: the attention features.

    Returns:
        {feature: B x C}: the input's keys with each feature's `<name>#j` keys replaced by `<name>`
        (placed where `<name>#0` was).

    Raises:
        KeyError: a position slice or a target is missing from `pooled` (names it).
    """
    by_first = {position_key(a.feature, 0): a for a in attention}
    positions = {k for a in attention for k in a.position_keys()}
    keys = kjt.keys()
    lengths_SB = kjt.lengths().view(len(keys), -1)
    out: dict[str, torch.Tensor] = {}
    for key, t_BC in pooled.items():
        a = by_first.get(key)
        if a is not None:
            for k in (*a.position_keys(), a.target):
                if k not in pooled:
                    raise KeyError(f"pooled embeddings have no key '{k}' (for '{a.feature}'); keys: {sorted(pooled)}")
            k_BOC = torch.stack([pooled[k] for k in a.position_keys()], dim=1)
            n_B = lengths_SB[keys.index(a.feature)].clamp(max=a.max_len)
            out[a.feature] = attention_pool(k_BOC, pooled[a.target], n_B)
        elif key not in positions:
            out[key] = t_BC
    return out
