"""`train.ema.WeightEMA`: the average's closed form with the warm-up, swapping in and out, the checkpoint
state round trip, the config range; the 2-rank run through the real entry point is in test_trainer.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from config.training import TrainingConfig
from schema import ConfigError
from train.ema import WeightEMA, ema_decay_at


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_average_is_the_bias_corrected_exponential_average_of_the_trajectory() -> None:
    """a_n = sum_k (1 - d) d^(n - k) w_k / (1 - d^n) over the weights after each update; a_1 = w_1."""
    assert ema_decay_at(0.9, 1) == 0.0 and ema_decay_at(0.9, 2) == pytest.approx(0.9 * 0.1 / 0.19)
    assert ema_decay_at(0.9, 500) == pytest.approx(0.9)
    model = _model()
    ema = WeightEMA(model, 0.9)
    values = [3.0, -1.0, 0.5, 2.0, 7.0, -4.0]
    for n, v in enumerate(values, start=1):
        _set(model, v)
        ema.update()
        expected = sum(0.1 * 0.9 ** (n - k) * w for k, w in enumerate(values[:n], start=1)) / (1 - 0.9**n)
        assert ema.updates == n
        for a in ema.shadow.values():  # the initial weights never enter
            torch.testing.assert_close(a, torch.full_like(a, expected), rtol=1e-6, atol=1e-6)


def test_applied_swaps_the_average_in_and_the_training_weights_back_exactly() -> None:
    model = _model()
    ema = WeightEMA(model, 0.5)
    _set(model, 1.0)
    ema.update()
    _set(model, 3.0)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    average = {n: a.clone() for n, a in ema.shadow.items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with ema.applied() as training_weights:
        for n, p in model.named_parameters():
            assert torch.equal(p, average[n]) and torch.equal(training_weights[n], trained[n])
        with ema.applied() as inner:  # nested: no second swap
            assert inner == {} and all(torch.equal(p, average[n]) for n, p in model.named_parameters())
        with pytest.raises(RuntimeError, match="inside applied"):
            ema.update()
    for n, p in model.named_parameters():
        assert torch.equal(p, trained[n])
    for n, b in model.named_buffers():  # batch-norm statistics are not averaged
        assert torch.equal(b, buffers[n])


def test_off_is_a_no_op_and_finalize_keeps_the_average() -> None:
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    off = WeightEMA(model, 0.0)
    off.update()
    with off.applied() as w:
        assert w == {}
    off.finalize()
    assert off.shadow == {} and all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    on = WeightEMA(model, 0.5)
    _set(model, 4.0)
    on.update()
    average = {n: a.clone() for n, a in on.shadow.items()}
    on.finalize()
    assert not on.enabled and all(torch.equal(p, average[n]) for n, p in model.named_parameters())
    on.update()  # after the end of training nothing moves
    with on.applied() as w:
        assert w == {}
    assert all(torch.equal(p, average[n]) for n, p in model.named_parameters())


def test_checkpoint_state_round_trip_restores_training_weights_and_average() -> None:
    """What `train.checkpoint` does: save the averaged weights as the model's plus the training state,
    load the model's weights into a fresh model, then the state."""
    model = _model()
    ema = WeightEMA(model, 0.7)
    for v in (1.0, 2.0, 5.0):
        _set(model, v)
        ema.update()
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied() as training_weights:
        files = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = ema.training_state(training_weights)
    fresh = _model(seed=1)
    fresh.load_state_dict({**fresh.state_dict(), **files})
    back = WeightEMA(fresh, 0.7)
    back.load_training_state(state, "rank0.pt")
    assert back.updates == 3
    for n, p in fresh.named_parameters():
        assert torch.equal(p, trained[n]) and torch.equal(back.shadow[n], files[n])

    off = _model(seed=2)  # averaging off now: training resumes from the training weights
    WeightEMA(off, 0.0).load_training_state(state, "rank0.pt")
    assert all(torch.equal(p, trained[n]) for n, p in off.named_parameters())

    restart = WeightEMA(fresh, 0.7)  # a checkpoint written without averaging: the average restarts
    restart.load_training_state(None, "rank0.pt")
    assert restart.updates == 0 and all(torch.equal(restart.shadow[n], p) for n, p in fresh.named_parameters())

    wrong = nn.Linear(3, 1)
    with pytest.raises(ValueError, match=r"rank0\.pt: its EMA training weights do not match the model"):
        WeightEMA(wrong, 0.7).load_training_state(state, "rank0.pt")


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan")])
def test_decay_out_of_range_is_a_config_error(bad: float) -> None:
    with pytest.raises(ConfigError, match="training.ema_decay"):
        TrainingConfig(ema_decay=bad).validate()
    with pytest.raises(ValueError, match="training.ema_decay"):
        WeightEMA(_model(), bad)
