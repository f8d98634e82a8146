"""An exponential moving average of the dense model's weights (`training.ema_decay`).

    ema = WeightEMA(model, decay=0.99)
    ema.update()                       # after every optimizer step
    with ema.applied():                # the model holds the averaged weights inside the block
        metrics = evaluate(...)

After update n (1-based) every parameter's average is the bias-corrected exponential average of the
weights after steps 1..n (Adam's correction of its moments),

    a_n = sum_k (1 - d) d^(n - k) w_k / (1 - d^n),   i.e.   a_n = d_n a_(n-1) + (1 - d_n) w_n,
    d_n = d (1 - d^(n - 1)) / (1 - d^n)               (d_1 = 0: a_1 = w_1),

so the initial weights never enter it and its window is ~1 / (1 - d) steps from the first step on. Only
parameters are averaged (batch-norm statistics are buffers and stay as trained); the embedding tables are
not part of the dense model (their fused row-wise optimizer updates them in place) and are not averaged.
Each rank averages the parameters it holds, experts included (this rank's shard), so data-parallel ranks
hold the same averages. Checkpoints store the averaged weights as the model's weights (so evaluate, export,
predict and the restored best checkpoint all read them as they are) and the training weights beside
them for resuming (`train.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay d_n of update n = `updates` (1-based) of the bias-corrected average: d (1 - d^(n-1)) / (1 - d^n)."""
    return decay * (1.0 - decay ** (updates - 1)) / (1.0 - decay**updates)


class WeightEMA:
    """The averaged copy of `model`'s parameters; with decay 0 nothing is averaged (update, applied and
    finalize do nothing; load_training_state still puts a checkpoint's training weights back).

    Args:
        model: the dense model (its parameters, in `named_parameters` order, are averaged).
        decay: the average's decay in [0, 1); 0 turns it off.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"training.ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.finalized = False
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.shadow: dict[str, torch.Tensor] = (
            {n: p.detach().clone() for n, p in self.params.items()} if decay > 0 else {}
        )
        self._lists = (list(self.shadow.values()), list(self.params.values()))  # the per-step lerp's operands
        self._swapped = False

    @property
    def enabled(self) -> bool:
        """Averaging is on and the model does not yet hold the averages for good (`finalize`)."""
        return self.decay > 0 and not self.finalized

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameters into the average (after each optimizer step)."""
        if not self.enabled:
            return
        if self._swapped:
            raise RuntimeError("WeightEMA.update inside applied(): the model holds the averages there")
        self.updates += 1
        d = ema_decay_at(self.decay, self.updates)
        torch._foreach_lerp_(*self._lists, 1.0 - d)

    @torch.no_grad()
    def _swap(self) -> None:
        for name, p in self.params.items():
            held = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name].copy_(held)
        self._swapped = not self._swapped

    @contextmanager
    def applied(self) -> Iterator[dict[str, torch.Tensor]]:
        """Inside the block the model holds the averaged weights; yields the training weights (name ->
        tensor, only valid inside the block; {} when averaging is off). Nesting is a no-op."""
        if not self.enabled or self._swapped:
            yield {}
            return
        self._swap()
        try:
            yield self.shadow
        finally:
            self._swap()

    @torch.no_grad()
    def finalize(self) -> None:
        """The model keeps the averaged weights from now on (the end of training); later calls do nothing."""
        if self.enabled:
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
            self.finalized = True

    def training_state(self, training_weights: dict[str, torch.Tensor]) -> dict[str, object]:
        """What a checkpoint stores beside the averaged weights: {updates, weights (the training weights,
        on the CPU)}; `training_weights` is what `applied()` yielded."""
        return {"updates": self.updates, "weights": {n: t.detach().cpu().clone() for n, t in training_weights.items()}}

    @torch.no_grad()
    def load_training_state(self, state: dict[str, object] | None, source: str) -> None:
        """After a checkpoint's (averaged) weights were loaded into the model: they become the average and
        `state["weights"]` the model's training weights again, so training resumes exactly. Without a state
        (a checkpoint written with averaging off) the average restarts from the loaded weights; with
        averaging off, a state's training weights go back into the model (training resumes from them).

        Raises:
            ValueError: the state's weights do not name the model's parameters (`source` names the file).
        """
        if state is None:
            if self.decay > 0:
                for name, p in self.params.items():
                    self.shadow[name].copy_(p.detach())
                self.updates = 0
            return
        weights = state["weights"]
        assert isinstance(weights, dict)
        if set(weights) != set(self.params):
            missing, extra = sorted(set(self.params) - set(weights)), sorted(set(weights) - set(self.params))
            raise ValueError(
                f"{source}: its EMA training weights do not match the model (missing {missing[:3]}, extra {extra[:3]})"
            )
        for name, p in self.params.items():
            if self.decay > 0:
                self.shadow[name].copy_(p.detach())
            p.copy_(weights[name].to(p.device, p.dtype))
        self.updates = int(state["updates"])  # type: ignore[call-overload]
