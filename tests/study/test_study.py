"""launch.study: the [study] table (errors name the key), --smoke merging, per-run job trees, data
synthesis when missing, lr picking, and a real 2-model x 1-seed study end to end (subprocess runs of
launch.train), run twice to show that finished runs are reused, not retrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch import study as study_cli
from pipeline.tools.synth import generate
from study import report
from study import runner as study

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "study.toml"


def minimal_study(**over: object) -> dict:
    return {"seeds": [0, 1], "lr_grid": [0.003], "arms": {"rankmixer": {"model": {"name": "rankmixer"}}}} | over


def test_parse_study_errors_name_the_key() -> None:
    with pytest.raises(study.StudyError, match=r"f.toml: unknown key 'study.sedes'"):
        study.parse_study(minimal_study(sedes=[0]), "f.toml")
    with pytest.raises(study.StudyError, match=r"study.tune_seed \(5\)"):
        study.parse_study(minimal_study(tune_seed=5), "f.toml")
    with pytest.raises(study.StudyError, match="study.seeds must be integers"):
        study.parse_study(minimal_study(seeds=["0"]), "f.toml")
    with pytest.raises(study.StudyError, match="study.launcher"):
        study.parse_study(minimal_study(launcher="mpirun"), "f.toml")
    with pytest.raises(study.StudyError, match=r"study.scaling.x.same_as = 'dcnv2'"):
        study.parse_study(minimal_study(scaling={"x": {"same_as": "dcnv2"}}), "f.toml")
    with pytest.raises(study.StudyError, match=r"study.synth"):
        study.parse_study(minimal_study(synth={"rows": 10, "colour": 1}), "f.toml")
    spec = study.parse_study(minimal_study(synth={"rows": 10}), "f.toml")
    assert spec.synth is not None and spec.synth.rows == 10 and spec.synth.out == "data/study"


def test_load_study_full_smoke_and_overrides(tmp_path: Path) -> None:
    spec, cfg = study.load_study(CONFIG, False, [], tmp_path)
    assert list(spec.arms) == [
        "dlrm_mlp", "dcnv2", "self_attention", "rankmixer_shared_ffn", "rankmixer_no_mixing", "rankmixer",
        "rankmixer_moe",
    ]  # fmt: skip
    assert spec.seeds == [0, 1, 2] and len(spec.lr_grid) >= 2 and cfg.data.train == "data/study/train"
    assert (tmp_path / "job_base.toml").exists()
    smoke, scfg = study.load_study(CONFIG, True, ["--training.warmup_steps", "7"], tmp_path)
    assert smoke.synth is not None and scfg.data.train == f"{smoke.synth.out}/train"
    assert smoke.arms == spec.arms and scfg.training.warmup_steps == 7
    with pytest.raises(study.StudyError, match="unknown config key 'training.stepz'"):
        study.load_study(CONFIG, False, ["--training.stepz", "3"], tmp_path)


def test_make_run_trees_are_independent(tmp_path: Path) -> None:
    spec, cfg = study.load_study(CONFIG, False, [], tmp_path)
    base = cfg.to_dict()
    a = study.make_run(base, "rankmixer", spec.arms["rankmixer"], 0, {"training.lr": 0.001}, 10, tmp_path, spec)
    b = study.make_run(base, "dcnv2", spec.arms["dcnv2"], 1, {"training.lr": 0.003}, 10, tmp_path, spec)
    assert a.run_id == "rankmixer__s0__lr0.001__n10" and b.run_id == "dcnv2__s1__lr0.003__n10"
    assert a.tree["training"]["output_dir"] != b.tree["training"]["output_dir"]
    assert (a.tree["training"]["seed"], b.tree["training"]["seed"]) == (0, 1)
    assert a.tree["model"]["name"] == "rankmixer" and b.tree["model"]["name"] == "dcnv2"
    assert base["training"]["lr"] == cfg.training.lr  # the base is never mutated
    moe = study.make_run(
        base, "rankmixer_moe", spec.arms["rankmixer_moe"], 0, {"training.lr": 0.003}, 10, tmp_path, spec
    )
    grid = study.make_run(base, "dlrm_mlp", {}, 0, {"training.lr": 0.003, "model.dropout": 0.1}, 10, tmp_path, spec)
    assert grid.run_id == "dlrm_mlp__s0__lr0.003__dropout0.1__n10" and grid.tree["model"]["dropout"] == 0.1
    assert moe.tree["moe"]["enabled"] and moe.tree["moe"]["target_activation"] == 0.25
    tuned = {a: {"best": {"training.lr": 0.002}} for a in spec.arms}
    runs, points = study.plan_scaling(base, spec, tuned, 10, tmp_path)
    assert ("rankmixer_s", "rankmixer", "rankmixer__s0__lr0.002__n10") in points  # same_as: reuses the arm's run
    assert len(runs) == len(points) - 3 and all(r.run_id.startswith("scale_") for r in runs)
    assert {f for _, f, _ in points} == {"rankmixer", "dlrm_mlp", "dcnv2"}
    study.validate_run(runs[0], spec, tmp_path / "v.toml")
    assert runs[0].cost == pytest.approx(report.train_flops_per_sample(cfg_of(runs[0], tmp_path)) * 10 * 512)
    spec.launcher = "torchrun"
    assert (
        study.make_run(base, "rankmixer", {}, 0, {"training.lr": 0.001}, 10, tmp_path, spec).tree["data"]["batch_size"]
        == 256
    )


def cfg_of(run: study.Run, tmp_path: Path):
    import tomli_w

    from config import load_config

    (tmp_path / "c.toml").write_text(tomli_w.dumps(run.tree))
    return load_config(["--config", str(tmp_path / "c.toml")])


def test_pick_points_on_validation_when_there_is_some() -> None:
    def rec(click: float, finish: float, valid: float | None = None) -> dict:
        summary = {"eval": {"click": {"auc": click}, "finish": {"auc": finish}}}
        return {"summary": summary | ({"valid": {"best": valid}} if valid is not None else {})}

    points = [{"training.lr": lr} for lr in (0.001, 0.003, 0.01)]
    trials = [("m", points[0], rec(0.70, 0.80)), ("m", points[1], rec(0.72, 0.79)), ("m", points[2], rec(0.75, 0.70))]
    out = report.pick_points(trials, ["m", "untuned"], points, 3)
    assert out["m"]["best_lr"] == 0.003 and out["m"]["grid"]["lr0.01"] == pytest.approx(0.725)
    assert out["m"]["picked_on"] == "eval"
    assert out["untuned"]["best"] == points[0] and out["untuned"]["steps"] == 0
    # with validation rows the validation metric decides, never the eval (test) AUC
    trials = [("m", points[0], rec(0.70, 0.80, valid=0.9)), ("m", points[1], rec(0.99, 0.99, valid=0.8))]
    out = report.pick_points(trials, ["m"], points[:2], 3)
    assert out["m"]["best"] == points[0] and out["m"]["picked_on"] == "valid"
    loss = report.pick_points(trials, ["m"], points[:2], 3, metric="logloss")  # lower is better
    assert loss["m"]["best"] == points[1]


def test_ensure_data_generates_only_the_synth_output(tmp_path: Path) -> None:
    synth = report.SynthSpec(out=str(tmp_path / "d"), rows=1500, files=1, eval_fraction=0.2, row_group_size=512)
    tree = {"data": {"train": str(tmp_path / "d" / "train")}}
    report.ensure_data(tree, synth)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["eval", "train"]
    with pytest.raises(FileNotFoundError, match="not found"):
        report.ensure_data({"data": {"train": str(tmp_path / "mine" / "train")}}, synth)


def test_study_end_to_end_and_resume(tmp_path: Path) -> None:
    generate(tmp_path / "data", 3000, 2, 0, 0.25, 512, "zstd")
    out = tmp_path / "study"
    argv = [
        "--config", str(CONFIG), "--out", str(out), "--models", "dlrm_mlp,rankmixer", "--seeds", "0",
        "--lr-grid", "0.003", "--steps", "3", "--scaling", "rankmixer_s,dlrm_s", "--jobs", "2",
        "--data.train", str(tmp_path / "data" / "train"), "--data.eval", str(tmp_path / "data" / "eval"),
        "--data.batch_size", "64", "--data.eval_batch_size", "512", "--training.log_every", "1",
    ]  # fmt: skip
    res = study_cli.main(argv)
    assert res["study"]["runs_trained"] == 2 and res["study"]["runs_reused"] == 0
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["study"]["runs_trained"] == 2 and set(on_disk["models"]) == {"dlrm_mlp", "rankmixer"}
    for arm in ("dlrm_mlp", "rankmixer"):
        m = on_disk["models"][arm]
        assert m["seeds"] == [0] and m["params"] > 0 and m["flops_per_sample"] > 0
        for task in ("click", "finish"):
            row = m["tasks"][task]
            assert 0.0 <= row["auc"]["mean"] <= 1.0 and row["auc"]["spread"] == 0.0 and "oracle_share" in row
    assert set(on_disk["oracle"]) == {"click", "finish"}
    statuses = {(c["check"], c["task"]): c["status"] for c in on_disk["checks"]}
    assert statuses[("rankmixer >= dlrm_mlp", "click")] in ("PASS", "MISS")
    assert statuses[("rankmixer >= dcnv2", "click")] == "N/A"
    assert {p["family"] for p in on_disk["scaling"]} == {"rankmixer", "dlrm_mlp"} and (out / "scaling.png").exists()
    md = (out / "results.md").read_text()
    assert "## click" in md and "| rankmixer | 1 |" in md and "## Quality targets" in md
    summaries = sorted((out / "runs").glob("*/summary.json"))
    assert len(summaries) == 2 and not list((out / "runs").glob("*/checkpoints"))
    stamps = [p.stat().st_mtime_ns for p in summaries]

    again = study_cli.main(argv)
    assert again["study"]["runs_trained"] == 0 and again["study"]["runs_reused"] == 2
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    assert again["models"]["rankmixer"]["tasks"]["click"]["auc"] == res["models"]["rankmixer"]["tasks"]["click"]["auc"]

    # A finished run is reused only for the config it was trained from: a changed arm is an error, not stale data.
    with pytest.raises(study.StudyError, match=r"rankmixer__s0__lr0.003__n3 was trained from another config"):
        study_cli.main([*argv, "--model.tower_hidden", "[32]"])
    assert [p.stat().st_mtime_ns for p in summaries] == stamps


def test_reuse_ignores_settings_another_code_version_added() -> None:
    stored = {"training": {"lr": 0.003, "output_dir": "a"}, "data": {"batch_size": 64}}
    newer = {"training": {"lr": 0.003, "output_dir": "b"}, "data": {"batch_size": 64, "verify_checksums": True}}
    assert study._same_job(stored, newer)  # a field added since (its default keeps the old behaviour)
    changed = {"training": {"lr": 0.01, "output_dir": "a"}, "data": {"batch_size": 64}}
    assert not study._same_job(stored, changed)


def test_grid_option_parses_typed_values_and_multiplies_points(tmp_path: Path) -> None:
    grid = study.parse_grid(["model.dropout=0,0.1", "features.dense_buckets=32,128"])
    assert grid == {"model.dropout": [0.0, 0.1], "features.dense_buckets": [32, 128]}
    spec, _ = study.load_study(CONFIG, False, [], tmp_path)
    spec.lr_grid, spec.grid = [0.001, 0.003], grid
    points = study.grid_points(spec)
    assert len(points) == 8 and points[1] == {"training.lr": 0.001, "model.dropout": 0.0, "features.dense_buckets": 128}
    with pytest.raises(study.StudyError, match="unknown config key 'model.dropuot'"):
        study.parse_grid(["model.dropuot=0,1"])
    with pytest.raises(study.StudyError, match="expected an integer"):
        study.parse_grid(["features.dense_buckets=many"])


def test_study_runs_log_to_wandb_in_one_group(tmp_path: Path) -> None:
    """study.wandb: every run logs to W&B, grouped by the study, tagged by arm; the W&B settings are not part
    of what makes a finished run reusable."""
    spec = study.StudySpec(seeds=[0], lr_grid=[0.001], arms={"rankmixer": {}}, wandb=True)
    base = {"training": {"name": "x"}, "data": {"batch_size": 64}, "metrics": {"wandb": False}}
    run = study.make_run(base, "rankmixer", {}, 0, {"training.lr": 0.001}, 5, tmp_path / "my_study", spec)
    assert run.tree["metrics"] == {
        "wandb": True,
        "wandb_group": "my_study",
        "wandb_job_type": "study",
        "wandb_tags": ["rankmixer"],
    }
    quiet = study.make_run(
        base, "rankmixer", {}, 0, {"training.lr": 0.001}, 5, tmp_path / "my_study", study.StudySpec()
    )
    assert quiet.tree["metrics"] == {"wandb": False}
    assert study._same_job(run.tree, quiet.tree)  # turning W&B on does not retrain finished runs
