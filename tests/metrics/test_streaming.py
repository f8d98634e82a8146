"""Bounded-memory eval metrics against the exact ones: AUC within the bound it reports (data with ties),
the sums exact, UAUC exact through owner ranks, 2 ranks == 1 rank, memory flat in the number of rows."""

from __future__ import annotations

import math

import pytest
import torch

from metrics.auc import EvalAccumulator
from metrics.streaming import StreamingEvalAccumulator, histogram_auc
from tests.metrics.test_auc import _rank_batches

CPU = torch.device("cpu")
TASKS = ["ctr", "cvr"]


def _data(n: int, seed: int, ties: bool = True) -> tuple[torch.Tensor, ...]:
    """B x 2 probabilities (rounded to 3 digits when `ties`: many exact ties), labels that depend on them,
    users (~n/8 of them), weights in {0, 0.5, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    p = torch.sigmoid(z - 2.0)
    if ties:
        p = (p * 1000).round() / 1000
    y = (torch.rand(n, 2, generator=g) < torch.sigmoid(1.5 * z - 2.0)).float()
    users = torch.randint(0, max(1, n // 8), (n,), generator=g)
    w = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.randint(0, 4, (n,), generator=g)]
    return p, y, users, w


def _both(batches: list[tuple[torch.Tensor, ...]], **kw: object) -> tuple[dict, dict]:
    exact, stream = EvalAccumulator(TASKS), StreamingEvalAccumulator(TASKS, CPU, **kw)  # type: ignore[arg-type]
    for b in batches:
        exact.update(*b)
        stream.update(*b)
    return exact.compute(), stream.compute()


@pytest.mark.parametrize("ties", [True, False])
def test_matches_the_exact_metrics_within_the_stated_bound(ties: bool) -> None:
    exact, stream = _both([_data(n, seed=s, ties=ties) for s, n in enumerate([5000, 3000, 1234])])
    for t in TASKS:
        e, s = exact[t], stream[t]
        assert s["auc_bound"] <= 1e-4, s  # the default grid's stated bound
        assert abs(s["auc"] - e["auc"]) <= s["auc_bound"] + 1e-12, (t, s["auc"], e["auc"], s["auc_bound"])
        for name in ("logloss", "ne", "ctr", "uauc"):
            assert s[name] == pytest.approx(e[name], rel=1e-9, abs=1e-12), name
        assert s["count"] == e["count"]


def test_coarse_grid_error_stays_inside_its_bound() -> None:
    """With 64 bins the histogram AUC is visibly off, and the bound it reports covers the error."""
    exact, stream = _both([_data(4000, seed=9, ties=False)], bins=64, users=False)
    for t in TASKS:
        err = abs(stream[t]["auc"] - exact[t]["auc"])
        assert 1e-5 < err <= stream[t]["auc_bound"]
        assert math.isnan(stream[t]["uauc"])


def test_histogram_auc_closed_form() -> None:
    # negatives in bins 0 and 2, positives in bins 1 and 2: pairs (1>0) 1, (2>0) 1, (2=2) 1/2 each; (1<2) 0
    hist = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    auc, bound = histogram_auc(hist)
    assert auc == pytest.approx((1 + 1 + 0.5 + 0) / 4) and bound == pytest.approx(0.5 * 1 / 4)
    assert all(math.isnan(v) for v in histogram_auc(torch.zeros(2, 3, dtype=torch.float64)))


def test_memory_does_not_grow_with_rows() -> None:
    acc = StreamingEvalAccumulator(TASKS, CPU, users=False)
    acc.update(*_data(1000, seed=1))
    small = acc.memory_bytes()
    for s in range(20):
        acc.update(*_data(5000, seed=s + 2))
    assert acc.memory_bytes() == small == 2 * 4 * 2**18 * 8 + 7 * 8
    with pytest.raises(ValueError, match="metrics.eval_auc_bins"):
        StreamingEvalAccumulator(TASKS, CPU, bins=1)


def _two_ranks() -> dict:
    import torch.distributed as dist  # noqa: PLC0415

    acc = StreamingEvalAccumulator(TASKS, CPU)
    for batch in _rank_batches(dist.get_rank()):  # unequal sizes per rank, padding rows, users on both ranks
        acc.update(*batch)
    return acc.compute()


def test_two_ranks_equal_one_process(dist_pool) -> None:
    r0, r1 = dist_pool.run(_two_ranks)
    assert r0 == r1
    single = StreamingEvalAccumulator(TASKS, CPU)
    exact = EvalAccumulator(TASKS)
    for batch in _rank_batches(0) + _rank_batches(1):
        single.update(*batch)
        exact.update(*batch)
    one, ref = single.compute(), exact.compute()
    for t in TASKS:
        for name, value in one[t].items():
            assert r0[t][name] == pytest.approx(value, rel=1e-12, abs=1e-15), (t, name)
        assert r0[t]["uauc"] == pytest.approx(ref[t]["uauc"], rel=1e-12)
        assert abs(r0[t]["auc"] - ref[t]["auc"]) <= r0[t]["auc_bound"] + 1e-12
