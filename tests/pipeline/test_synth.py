"""The synthetic log: schema matches the configs, deterministic, and its teacher beats a linear model."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from config import load_config
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset
from pipeline.tools.synth import auc, main
from tests.pipeline.ids_ref import map_ids

ROWS = 40_000


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    res = main(["--out", str(out), "--rows", str(ROWS), "--files", "3", "--seed", "7", "--row-group-size", "4000"])
    return out, res


def test_layout_and_unique_row_ids(synth):
    out, res = synth
    assert res["train_rows"] + res["eval_rows"] == ROWS
    assert len(list((out / "train").glob("part-*.parquet"))) == 3
    assert len(list((out / "eval").glob("part-*.parquet"))) == 1
    ids = np.concatenate([pq.read_table(out / s, columns=["row_id"]).column(0).to_numpy() for s in ("train", "eval")])
    assert np.array_equal(np.sort(ids), np.arange(ROWS))
    assert 0.15 < res["eval_rows"] / ROWS < 0.25


@pytest.mark.parametrize("config", ["configs/tiny.toml", "configs/default.toml"])
def test_schema_matches_config_features(synth, config):
    out, _ = synth
    cfg = load_config(["--config", config])
    plan = plan_dataset(str(out / "eval"), cfg.data, cfg.features)  # raises DataError on any mismatch
    loader = ParquetLoader(
        plan, cfg.data, cfg.features, rank=0, world_size=1, batch_size=64, seed=0, shuffle=True, drop_last=True,
        num_workers=0,
    )  # fmt: skip
    b = next(iter(loader))
    assert b.labels.shape == (64, 2) and b.dense.shape == (64, 8)
    seq = b.sparse.to_dict()["s_item"].lengths()
    assert seq.max() <= 32 and (seq >= 0).all()


def test_deterministic_and_independent_of_files(tmp_path):
    a = main(["--out", str(tmp_path / "a"), "--rows", "3000", "--files", "2", "--seed", "1"])
    main(["--out", str(tmp_path / "b"), "--rows", "3000", "--files", "2", "--seed", "1"])
    main(["--out", str(tmp_path / "c"), "--rows", "3000", "--files", "5", "--seed", "1"])
    main(["--out", str(tmp_path / "d"), "--rows", "3000", "--files", "2", "--seed", "2"])
    ta, tb, tc, td = (pq.read_table(tmp_path / x / "train").sort_by("row_id") for x in "abcd")
    assert ta.equals(tb) and ta.equals(tc) and a["train_rows"] == ta.num_rows
    assert not ta.column("click").equals(td.column("click"))


def _features(t, vocab: int):
    names = [f"{g}{j}" for g, k in (("u", 8), ("i", 8), ("c", 6)) for j in range(k)]
    x = np.stack([map_ids(t.column(c).to_numpy(), vocab, "hash") + j * vocab for j, c in enumerate(names)], 1)
    d = np.stack([t.column(f"d{j}").to_numpy() for j in range(8)], 1)
    return torch.from_numpy(x), torch.from_numpy(d), len(names)


def test_oracle_beats_linear_model(synth):
    """A logistic regression on one-hot (hashed) ids + dense, fit on train, vs the oracle, on eval."""
    out, _ = synth
    train, evals = pq.read_table(out / "train"), pq.read_table(out / "eval")
    vocab = 4096
    x_tr, d_tr, nf = _features(train, vocab)
    x_ev, d_ev, _ = _features(evals, vocab)
    y_tr = torch.from_numpy(train.column("click").to_numpy().astype(np.float32))
    y_ev = evals.column("click").to_numpy()
    torch.manual_seed(0)
    emb = torch.nn.EmbeddingBag(nf * vocab, 1, mode="sum")
    torch.nn.init.zeros_(emb.weight)
    lin = torch.nn.Linear(8, 1)
    opt = torch.optim.Adam([*emb.parameters(), *lin.parameters()], lr=0.02)
    for _ in range(4):
        for idx in torch.randperm(len(y_tr)).split(1024):
            z = emb(x_tr[idx]).squeeze(1) + lin(d_tr[idx]).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        lr_auc = auc((emb(x_ev).squeeze(1) + lin(d_ev).squeeze(1)).numpy(), y_ev)
    oracle_auc = auc(evals.column("oracle_p_click").to_numpy(), y_ev)
    rate = y_ev.mean()
    assert 0.1 < rate < 0.3, rate
    assert 0.75 < oracle_auc < 0.88, oracle_auc
    assert lr_auc > 0.6, lr_auc  # the linear model learns something (main effects are visible)
    assert oracle_auc - lr_auc > 0.07, (oracle_auc, lr_auc)  # ... but misses the planted interactions
    finish = evals.column("finish").to_numpy()
    assert (finish <= evals.column("click").to_numpy()).all()
    assert auc(evals.column("oracle_p_finish").to_numpy(), finish) > 0.75
