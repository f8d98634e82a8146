"""The sharded lookup in two halves, so a training loop can start batch i+1's input distribution while
step i computes (the idea of TorchRec's `TrainPipelineSparseDist`, written against its public
`ShardedModule` pieces because our model is two objects: the DMP-wrapped tables and the DeepSpeed
dense engine, which that pipeline cannot drive).

    started = start_lookup(dmp, batch.sparse)    # input dist: splits exchanged, id all-to-all in flight
    ...                                          # the previous step's dense forward / backward / update
    kt = finish_lookup(dmp, started)             # wait for the ids, look up, output dist -> KeyedTensor

`finish_lookup(dmp, start_lookup(dmp, kjt))` equals `dmp(kjt)`: the same TorchRec calls in the same
order (`ShardedModule.forward` is `input_dist(...).wait().wait()` then `compute_and_output_dist`), only
the first half moved earlier. It only moves ids, so an update of the tables in between (the fused
optimizer inside the previous step's backward) is seen by the lookup, as without pipelining.

A 'target_attention' feature's key is expanded into its position keys before the input dist
(`expand_sequences`, as `SparseArch.forward` does); `StartedLookup.kjt` keeps the original batch, whose
lengths divide the means and mask the attention after the lookup (`finish_pooling`).

Managed-collision tables are not pipelined (`pipelinable` is False): their input dist remaps ids and
updates eviction state, which must stay in step order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torchrec.distributed.types import ShardedModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embeddings.attention import expand_sequences
from embeddings.tables import SparseArch, finish_pooling


@dataclass
class StartedLookup:
    """A lookup whose input distribution is in flight."""

    kjt: KeyedJaggedTensor
    """The batch's ids as given, not expanded (their lengths divide the mean-pooled features and mask the
    attention-pooled ones)."""
    ctx: Any
    """The sharded module's context for this batch."""
    dist: Any
    """Awaitable of the distributed ids (the second stage of the input dist)."""


def _arch(dmp: nn.Module) -> SparseArch:
    arch = getattr(dmp, "module", dmp)
    if not isinstance(arch, SparseArch):
        raise TypeError(f"embeddings/pipelining.py: expected a DMP over a SparseArch, got {type(arch).__name__}")
    return arch


def pipelinable(dmp: nn.Module) -> bool:
    """Whether `dmp`'s lookup can be split: plain sharded tables only (no managed collision)."""
    arch = _arch(dmp)
    return arch.mc_ebc is None and isinstance(arch.ebc, ShardedModule)


def start_lookup(dmp: nn.Module, kjt: KeyedJaggedTensor) -> StartedLookup:
    """Start the input distribution of `kjt` (collective: every rank calls it for the same step)."""
    arch = _arch(dmp)
    ebc = arch.ebc
    assert isinstance(ebc, ShardedModule), "start_lookup needs pipelinable(dmp)"
    ctx = ebc.create_context()
    splits = ebc.input_dist(ctx, expand_sequences(kjt, arch.specs))
    return StartedLookup(kjt=kjt, ctx=ctx, dist=splits.wait())  # splits exchanged; the ids' all-to-all in flight


def finish_lookup(dmp: nn.Module, started: StartedLookup) -> KeyedTensor:
    """Wait for the ids, look them up and run the output dist: what `dmp(started.kjt)` returns."""
    arch = _arch(dmp)
    ebc = arch.ebc
    assert isinstance(ebc, ShardedModule), "finish_lookup needs pipelinable(dmp)"
    kt = ebc.compute_and_output_dist(started.ctx, started.dist.wait())
    if not arch.mean_features and not arch.attention:
        return kt
    return finish_pooling([kt], started.kjt, arch.mean_features, arch.attention)
