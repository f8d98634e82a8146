"""Trivial baselines of every report: priors exact against numpy (1 and 2 ranks), their AUCs against a
rank-statistic reference, and the below-prior warning (fires for a worse model, not for a better one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from metrics.baselines import PRIOR_ROWS, below_prior, fit_priors, score_baselines
from pipeline.config import DataConfig, FeaturesConfig, SparseFeature
from pipeline.plan import plan_dataset
from pipeline.tools.synth import auc as exact_auc

ROWS = 3000


def _table(seed: int, string_items: bool = False) -> pa.Table:
    rng = np.random.default_rng(seed)
    item = rng.zipf(1.4, ROWS).astype(np.int64) % 400
    quality = np.sin(item * 0.7)  # an item effect: popular-ish and good items click more
    click = (rng.random(ROWS) < 1 / (1 + np.exp(-(quality - 0.3)))).astype(np.int64)
    finish = click * (rng.random(ROWS) < 0.5)
    items = pa.array([f"it{x}" for x in item]) if string_items else pa.array(item)
    return pa.table({"click": click, "finish": finish, "item": items, "user": rng.integers(0, 50, ROWS)})


def _write(root: Path, seed: int, string_items: bool = False) -> str:
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(_table(seed, string_items), root / "part-0.parquet", row_group_size=700)
    return str(root)


def _features(string_items: bool = False) -> FeaturesConfig:
    return FeaturesConfig(
        labels=["click", "finish"], user_id="", item_id="item",
        sparse=[SparseFeature(name="item", dtype="string" if string_items else "int64")],
    )  # fmt: skip


def _plan(root: str, features: FeaturesConfig):
    return plan_dataset(root, DataConfig(train=root, row_id_column=""), features)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    base = tmp_path_factory.mktemp("baselines")
    return _write(base / "train", 0), _write(base / "eval", 1)


def test_priors_and_scores_equal_numpy(data) -> None:
    train, ev = data
    f = _features()
    priors = fit_priors(_plan(train, f), f)
    t = _table(0)
    items, click = t.column("item").to_numpy(), t.column("click").to_numpy()
    u, n = np.unique(items, return_counts=True)
    assert priors.items.tolist() == u.tolist() and priors.item_rows.tolist() == n.tolist()
    assert priors.positives_K.tolist() == [click.sum(), t.column("finish").to_numpy().sum()]
    e = _table(1)
    e_items, e_click = e.column("item").to_numpy(), e.column("click").to_numpy()
    counts = dict(zip(u.tolist(), n.tolist()))
    pos = {k: click[items == k].sum() for k in counts}
    pop = np.array([counts.get(x, 0) for x in e_items], np.float64)
    p0 = click.mean()
    ctr = np.array([(pos.get(x, 0) + PRIOR_ROWS * p0) / (counts.get(x, 0) + PRIOR_ROWS) for x in e_items])
    got = score_baselines(priors, _plan(ev, f), f, torch.device("cpu"), mode="exact")
    assert got["popularity"]["click"]["auc"] == pytest.approx(exact_auc(pop, e_click), abs=1e-9)
    assert got["item_ctr"]["click"]["auc"] == pytest.approx(exact_auc(ctr, e_click), abs=1e-9)
    clicks = np.array([pos.get(x, 0) for x in e_items], np.float64)
    assert got["item_positives"]["click"]["auc"] == pytest.approx(exact_auc(clicks, e_click), abs=1e-9)
    assert got["global_prior"]["click"]["auc"] == pytest.approx(0.5)
    ll = -np.mean(e_click * np.log(p0) + (1 - e_click) * np.log(1 - p0))
    assert got["global_prior"]["click"]["logloss"] == pytest.approx(ll, rel=1e-6)
    assert got["popularity"]["click"]["auc"] > 0.55  # the planted item effect makes the prior informative
    assert set(got["popularity"]["click"]) <= {"auc", "auc_bound"}  # a count has no logloss


def test_string_item_ids_and_no_item_column(tmp_path: Path) -> None:
    root = _write(tmp_path / "s", 2, string_items=True)
    f = _features(string_items=True)
    priors = fit_priors(_plan(root, f), f)
    assert len(priors.items) == len(np.unique(_table(2, True).column("item").to_numpy()))
    f.item_id = ""
    got = score_baselines(fit_priors(_plan(root, f), f), _plan(root, f), f, torch.device("cpu"))
    assert list(got) == ["global_prior"]


def _two_ranks(train: str, ev: str) -> dict:
    import torch.distributed as dist  # noqa: PLC0415

    from parallel.distributed import all_gather_object  # noqa: PLC0415

    f = _features()
    rank = dist.get_rank()
    priors = fit_priors(_plan(train, f), f, rank=rank, world_size=2, gather=all_gather_object)
    scores = score_baselines(priors, _plan(ev, f), f, torch.device("cpu"), rank=rank, world_size=2)
    return {"rows": priors.item_rows.tolist(), "scores": scores}


def test_two_ranks_equal_one(dist_pool, data) -> None:
    train, ev = data
    f = _features()
    priors = fit_priors(_plan(train, f), f)
    one = score_baselines(priors, _plan(ev, f), f, torch.device("cpu"))
    a, b = dist_pool.run(_two_ranks, train, ev)
    assert a["rows"] == b["rows"] == priors.item_rows.tolist()
    for name in one:
        assert a["scores"][name]["click"]["auc"] == pytest.approx(one[name]["click"]["auc"], abs=1e-12)


def test_below_prior_fires_only_when_the_model_is_worse() -> None:
    base = {"popularity": {"click": {"auc": 0.70}}, "item_ctr": {"click": {"auc": 0.68}}, "global_prior": {}}
    worse = below_prior({"click": {"auc": 0.678}}, base)
    assert len(worse) == 1 and "click AUC 0.6780 is below the popularity baseline's 0.7000" in worse[0]
    assert below_prior({"click": {"auc": 0.71}}, base) == []
    assert below_prior({"click": {"auc": 0.5}}, {"global_prior": {"click": {"auc": 0.5}}}) == []
