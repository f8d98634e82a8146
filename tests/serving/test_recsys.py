"""configs/recsys.toml (the click-log recipe: id vocabularies, OOV dropout, target attention, the derived
dense feature len(hist_items), the history's genres from the item catalogue) end to end on 2 ranks over a
generated time-ordered log: the vocabularies and the catalogue travel with the best checkpoint into
`evaluate` and with the artifact into `predict`, ids map the same way everywhere (unseen ids to the OOV
row), the report carries the trivial baselines and says when the model is below them."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
ROWS = 6000


def _train(data: str, out: str, *extra: str) -> dict:
    from launch.train import main

    args = ["--config", str(REPO / "configs" / "recsys.toml"), "--training.output_dir", out]
    args += ["--data.train", f"{data}/train", "--data.eval", f"{data}/test", "--data.global_batch_size", "256"]
    args += ["--training.epochs", "2", "--training.log_every", "100", "--metrics.progress", "false", *extra]
    return main(args)


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    from pipeline.tools import clicklog

    out = tmp_path_factory.mktemp("recsys") / "log"
    clicklog.main(["--out", str(out), "--rows", str(ROWS), "--seed", "3", "--files", "2", "--row-group-size", "1000"])
    return out


def _raw(split: Path, column: str) -> np.ndarray:
    return (
        pa.concat_tables(pq.read_table(f, columns=[column]) for f in sorted(split.glob("*.parquet")))
        .column(column)
        .to_numpy()
    )


def test_recipe_vocab_travels_into_evaluate_export_and_predict(dist_pool, log: Path, tmp_path: Path) -> None:
    from launch.evaluate import main as evaluate
    from pipeline.vocab import VOCAB_FILE, load_vocabs
    from serving.export import export
    from serving.model import load_artifact, load_run_config
    from serving.predict import predict_dataset, prediction_metrics

    run = tmp_path / "recsys"
    summary = dist_pool.run(_train, str(log), str(run))[0]
    saved = tomllib.loads((run / "config.toml").read_text())["data"]
    assert (saved["global_batch_size"], saved["batch_size"]) == (256, 128)  # 256 rows per step over 2 ranks
    cfg = load_run_config(run)
    sizes = {sf.name: sf.vocab_size for sf in cfg.features.sparse}
    assert all(isinstance(v, int) for v in sizes.values())  # "auto" resolved into config.toml
    assert sizes["item_id"] == sizes["hist_items"] == summary["vocab"]["item"]["rows"]  # one vocabulary per table
    vocabs = load_vocabs(run / VOCAB_FILE, cfg.features)
    best = run / "checkpoints" / "best"
    assert (best / VOCAB_FILE).read_bytes() == (run / VOCAB_FILE).read_bytes()  # every checkpoint carries it
    assert summary["data"]["valid_rows"] > 0 and summary["valid"]["restored_best"]
    base = summary["baselines"]["eval"]
    assert set(base) == {"global_prior", "popularity", "item_positives", "item_ctr"}
    assert base["global_prior"]["click"]["auc"] == pytest.approx(0.5)
    assert isinstance(summary["below_prior"], list)
    # the derived len(hist_items): statistics over the training rows before the carve (file order = time)
    stats = json.loads((run / "dense_preprocess.json").read_text())["len(hist_items)"]["stats"]
    lens = np.array([len(h) for h in _raw(log / "train", "hist_items")], dtype=np.float64)
    assert 0 < stats["count"] < len(lens) and stats["max"] <= 20
    assert stats["mean"] == pytest.approx(lens[: stats["count"]].mean(), rel=1e-6)

    result = evaluate(["--run", str(run)])  # the best checkpoint, its vocabularies, unsharded tables
    # the same scores up to float summation order (sharded vs unsharded pooling): a score may cross one
    # histogram bin, so the two AUCs agree within their stated bounds; logloss to float rounding
    got, want = result["eval"]["click"], summary["eval"]["click"]
    assert abs(got["auc"] - want["auc"]) <= got["auc_bound"] + want["auc_bound"]
    assert result["eval"]["click"]["logloss"] == pytest.approx(summary["eval"]["click"]["logloss"], rel=1e-6)

    export(run, tmp_path / "artifact", eval_data="")
    model, manifest = load_artifact(tmp_path / "artifact")
    assert manifest["vocab"]["file"] == VOCAB_FILE
    for table, v in vocabs.items():
        assert np.array_equal(model.vocabs[table].ids, v.ids)
    # the history's genres: a catalogue of every training row's item (the carve too), in the artifact as well
    catalog = vocabs["genre"].catalogs["item_genres[hist_items]"]
    items, genres = (
        _raw(log / "train", "item_id"),
        pa.concat_tables(pq.read_table(f, columns=["item_genres"]) for f in sorted((log / "train").glob("*.parquet")))
        .column("item_genres")
        .to_pylist(),
    )
    first = dict(zip(reversed(items.tolist()), reversed(genres)))  # the earliest row of each item wins
    assert catalog.ids.tolist() == sorted(first)
    assert catalog.values.tolist() == [g for it in sorted(first) for g in first[it]]
    assert np.array_equal(model.vocabs["genre"].catalogs["item_genres[hist_items]"].values, catalog.values)
    cols = predict_dataset(model, str(log / "test"))
    metrics = prediction_metrics(cols, ["click"])["click"]
    label = summary["eval"]["click"]
    assert abs(metrics["auc"] - label["auc"]) <= label["auc_bound"] + 1e-12
    assert metrics["logloss"] == pytest.approx(label["logloss"], rel=1e-6)

    # test-period users never seen in training all read the OOV row, in training's mapping and predict's
    train_users = set(_raw(log / "train", "user_id").tolist())
    test_users = _raw(log / "test", "user_id")
    new = np.array([u not in train_users for u in test_users])
    assert new.any() and np.all(model.vocabs["user_id"].map(test_users[new]) == 0)


def test_a_model_below_the_popularity_prior_says_so(dist_pool, log: Path, tmp_path: Path) -> None:
    run = tmp_path / "weak"
    # two steps at a tiny learning rate: an untrained model, worse than counting clicks per item
    summary = dist_pool.run(
        _train, str(log), str(run), "--training.steps", "2", "--training.lr", "1e-6", "--embeddings.lr", "1e-6"
    )[0]
    assert summary["below_prior"] and "below the" in summary["below_prior"][0]
    saved = json.loads((run / "summary.json").read_text())
    assert saved["below_prior"] == summary["below_prior"]
