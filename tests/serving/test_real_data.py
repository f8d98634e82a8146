"""configs/adult.toml (real data, committed) end to end on 2 ranks: the dense statistics travel with the
best checkpoint into `evaluate` and into the exported artifact, whose predictions reproduce the
trainer's final test metrics (fp32; the exact AUC of predict within the bound of training's histogram AUC)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _train_adult(out: str) -> dict:
    from launch.train import main

    args = ["--config", str(REPO / "configs" / "adult.toml"), "--training.output_dir", out]
    args += ["--training.epochs", "2", "--training.log_every", "100", "--metrics.progress", "false"]
    return main(args)


def test_adult_artifact_reproduces_the_trainers_test_metrics(dist_pool, tmp_path) -> None:
    from launch.evaluate import main as evaluate
    from serving.export import export
    from serving.model import load_artifact
    from serving.predict import predict_dataset, prediction_metrics

    run = tmp_path / "adult"
    summary = dist_pool.run(_train_adult, str(run))[0]
    assert summary["data"] == {"train_rows": 35165, "valid_rows": 3908, "eval_rows": 9769}  # the 90 / 10 carve
    assert summary["dense_preprocess"]["capital_gain"] == "bucketize"  # few distinct values: one bucket each
    assert summary["dense_preprocess"]["fnlwgt"] == "standardize"
    assert summary["valid"]["restored_best"] and summary["eval"]["label"]["auc"] > 0.85
    config = (run / "config.toml").read_text()
    assert 'capital_gain = "bucketize"' in config  # the resolved transforms: config.toml alone rebuilds the model
    stats = json.loads((run / "dense_preprocess.json").read_text())
    assert stats["age"]["stats"]["count"] == 35165  # training rows only, never the validation carve

    result = evaluate(["--run", str(run)])  # the best checkpoint by default
    assert result["checkpoint"].endswith("checkpoints/best")
    assert result["eval"]["label"]["auc"] == summary["eval"]["label"]["auc"]
    assert result["eval"]["label"]["logloss"] == summary["eval"]["label"]["logloss"]

    export(run, tmp_path / "artifact", eval_data="")
    model, _ = load_artifact(tmp_path / "artifact")
    cols = predict_dataset(model, str(REPO / "datasets" / "adult" / "test"))
    metrics = prediction_metrics(cols, ["label"])["label"]
    assert "user_id" not in cols  # the data has no user ids: no UAUC either
    # predict computes the exact AUC; training's eval the histogram one, within the bound it reports
    label = summary["eval"]["label"]
    assert abs(metrics["auc"] - label["auc"]) <= label["auc_bound"] + 1e-12 and metrics["count"] == 9769
    assert metrics["logloss"] == pytest.approx(label["logloss"], rel=1e-12)
