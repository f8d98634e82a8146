"""AUC / UAUC / logloss / NE against loop references, and the 2-rank accumulators against 1 process."""

from __future__ import annotations

import math

import pytest
import torch

from metrics.auc import EvalAccumulator, WindowedAUC, auc, logloss, normalized_entropy, uauc


def ref_auc(s: list[float], y: list[float], w: list[float]) -> float:
    """O(n^2) Mann-Whitney: every (positive, negative) pair, weight w_i * w_j, ties count 1/2."""
    num = den = 0.0
    for si, yi, wi in zip(s, y, w):
        for sj, yj, wj in zip(s, y, w):
            if yi > 0.5 and yj <= 0.5 and wi > 0 and wj > 0:
                den += wi * wj
                num += wi * wj * (1.0 if si > sj else 0.5 if si == sj else 0.0)
    return num / den if den > 0 else math.nan


def ref_uauc(s: list[float], y: list[float], u: list[int], w: list[float]) -> float:
    num = den = 0.0
    for user in sorted(set(u)):
        idx = [i for i in range(len(s)) if u[i] == user and w[i] > 0]
        a = ref_auc([s[i] for i in idx], [y[i] for i in idx], [w[i] for i in idx])
        if not math.isnan(a):
            imp = sum(w[i] for i in idx)
            num += a * imp
            den += imp
    return num / den if den > 0 else math.nan


def ref_logloss(p: list[float], y: list[float], w: list[float]) -> float:
    tot = sum(w)
    return sum(wi * -(yi * math.log(pi) + (1 - yi) * math.log(1 - pi)) for pi, yi, wi in zip(p, y, w)) / tot


def make_data(n: int, seed: int, num_users: int = 7) -> tuple[torch.Tensor, ...]:
    """Scores with many ties (1 decimal), labels correlated with scores, users, weights with zeros."""
    g = torch.Generator().manual_seed(seed)
    p = (torch.rand(n, generator=g) * 0.98 + 0.01).mul(10).round().div(10).clamp(0.05, 0.95)
    y = (torch.rand(n, generator=g) < p).float()
    users = torch.randint(0, num_users, (n,), generator=g) * 1_000_003 + 2**40  # large, sparse ids
    w = torch.randint(0, 3, (n,), generator=g).float()  # 0 = ignored, 1 or 2 impressions
    return p, y, users, w


def test_auc_matches_pairwise_reference_with_ties_and_weights():
    p, y, _, w = make_data(120, seed=1)
    assert auc(p, y, w) == pytest.approx(ref_auc(p.tolist(), y.tolist(), w.tolist()), abs=1e-12)
    ones = [1.0] * len(p)
    assert auc(p, y) == pytest.approx(ref_auc(p.tolist(), y.tolist(), ones), abs=1e-12)


def test_auc_edge_cases():
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert auc(torch.full((4,), 0.5), y) == 0.5
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])))
    # A zero weight removes the only negative: undefined.
    assert math.isnan(auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0])))
    with pytest.raises(ValueError, match="labels"):
        auc(torch.rand(4), torch.rand(5))


def test_uauc_matches_per_user_loop_and_skips_single_class_users():
    p, y, users, w = make_data(200, seed=2)
    # User 0 only negatives, user 1 only positives: both must be left out.
    u0, u1 = users[0].item(), users[1].item()
    y[users == u0] = 0.0
    y[users == u1] = 1.0
    expected = ref_uauc(p.tolist(), y.tolist(), users.tolist(), w.tolist())
    assert uauc(p, y, users, w) == pytest.approx(expected, abs=1e-12)
    # Dropping those users' rows does not change the result.
    keep = (users != u0) & (users != u1)
    assert uauc(p[keep], y[keep], users[keep], w[keep]) == pytest.approx(expected, abs=1e-12)
    # With one user, UAUC is that user's AUC.
    one = torch.zeros_like(users)
    assert uauc(p, y, one, w) == pytest.approx(auc(p, y, w), abs=1e-12)


def test_logloss_and_ne_match_loop():
    p, y, _, w = make_data(150, seed=3)
    ll = ref_logloss(p.tolist(), y.tolist(), w.tolist())
    assert logloss(p, y, w) == pytest.approx(ll, rel=1e-12)
    rate = (w * y).sum().item() / w.sum().item()
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert normalized_entropy(p, y, w) == pytest.approx(ll / entropy, rel=1e-12)
    # Predicting the base rate everywhere gives NE = 1.
    assert normalized_entropy(torch.full_like(p, rate), y, w) == pytest.approx(1.0, rel=1e-9)
    assert math.isnan(normalized_entropy(p, torch.zeros_like(y), w))


def _rank_batches(rank: int) -> list[tuple[torch.Tensor, ...]]:
    """Unequal sizes per rank (rank 0: 3 batches, rank 1: 2) with padding rows (weight 0, junk values)."""
    out = []
    for b, n in enumerate([17, 40, 9] if rank == 0 else [33, 25]):
        p1, y1, users, w = make_data(n, seed=100 * rank + b)
        p2, y2, _, _ = make_data(n, seed=100 * rank + b + 50)
        w = (w > 0).float()
        w[-3:] = 0.0  # padding at the end of every batch
        probs = torch.stack([p1, p2], 1)
        labels = torch.stack([y1, y2], 1)
        probs[w == 0] = 0.99
        labels[w == 0] = 0.0
        out.append((probs, labels, users, w))
    return out


def worker_eval_accumulator() -> tuple[dict, dict]:
    import torch.distributed as dist  # noqa: PLC0415

    rank = dist.get_rank()
    acc = EvalAccumulator(["ctr", "cvr"])
    win = WindowedAUC(["ctr", "cvr"], window=2, distributed=True)
    for batch in _rank_batches(rank):
        acc.update(*batch)
        probs, labels, _, w = batch
        win.update(probs, labels, w)
    return acc.compute(), win.compute()


def test_eval_accumulator_two_ranks_equals_one_process(dist_pool):
    results = dist_pool.run(worker_eval_accumulator)
    (r0, w0), (r1, w1) = results
    assert r0 == r1 and w0 == w1  # identical on every rank

    single = EvalAccumulator(["ctr", "cvr"])
    batches = _rank_batches(0) + _rank_batches(1)
    for batch in batches:
        single.update(*batch)
    ref = single.compute()
    assert set(r0) == {"ctr", "cvr"}
    for task in ("ctr", "cvr"):
        assert set(r0[task]) == {"auc", "uauc", "logloss", "ne", "count", "ctr"}
        for name, value in ref[task].items():
            assert r0[task][name] == pytest.approx(value, abs=1e-12), (task, name)
    # And against the plain reference functions on the concatenated real rows.
    probs = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    users = torch.cat([b[2] for b in batches])
    w = torch.cat([b[3] for b in batches])
    real = w > 0
    assert r0["ctr"]["count"] == int(real.sum())
    assert r0["ctr"]["auc"] == pytest.approx(
        ref_auc(probs[real, 0].tolist(), labels[real, 0].tolist(), [1.0] * int(real.sum()))
    )
    assert r0["cvr"]["uauc"] == pytest.approx(uauc(probs[real, 1], labels[real, 1], users[real]), abs=1e-12)
    assert r0["ctr"]["ctr"] == pytest.approx(labels[real, 0].double().mean().item(), abs=1e-12)

    # Windowed AUC: the last 2 batches of each rank, gathered.
    window = _rank_batches(0)[-2:] + _rank_batches(1)[-2:]
    wp = torch.cat([b[0] for b in window])
    wl = torch.cat([b[1] for b in window])
    ww = torch.cat([b[3] for b in window])
    assert w0["cvr"] == pytest.approx(auc(wp[:, 1], wl[:, 1], ww), abs=1e-12)


def test_windowed_auc_local_window_slides():
    win = WindowedAUC(["ctr"], window=2)
    assert math.isnan(win.compute()["ctr"])
    batches = [make_data(30, seed=s) for s in range(3)]
    for p, y, _, w in batches:
        win.update(p[:, None], y[:, None], w)
    p = torch.cat([b[0] for b in batches[1:]])
    y = torch.cat([b[1] for b in batches[1:]])
    w = torch.cat([b[3] for b in batches[1:]])
    assert win.compute()["ctr"] == pytest.approx(auc(p, y, w), abs=1e-12)
    with pytest.raises(ValueError, match="K=1"):
        win.update(torch.rand(4, 2), torch.rand(4, 2), torch.ones(4))
    with pytest.raises(ValueError, match="train_auc_window"):
        WindowedAUC(["ctr"], window=0)
