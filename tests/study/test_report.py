"""The study's arithmetic on summaries with known values: seed statistics, oracle shares, the quality
checks (PASS / MISS / N/A and their gaps), throughput from metrics.jsonl, the oracle AUC of the teacher,
the markdown report and the scaling plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.tools.synth import generate
from pipeline.tools.synth import report as synth_report
from study import report

TASKS = ["click", "finish"]


def summary(click: float, finish: float, params: int = 1000, flops: float = 2e6) -> dict:
    ev = {
        t: {"auc": a, "uauc": a - 0.05, "logloss": 0.5 - a / 10, "ne": 0.9}
        for t, a in (("click", click), ("finish", finish))
    }
    return {"eval": ev, "params": params, "flops_per_sample": flops, "samples_per_s": 100.0, "mfu": 0.01}


def record(seed: int, click: float, finish: float, **kw: float) -> dict:
    stats = {"samples_per_s": 1000.0 + seed, "mfu": 0.1, "moe_activation": kw.pop("act", None)}
    return {"seed": seed, "lr": 0.003, "summary": summary(click, finish, **kw), "stats": stats}


def test_mean_spread_is_mean_and_sample_std() -> None:
    s = report.mean_spread([0.70, 0.72, 0.74])
    assert s["mean"] == pytest.approx(0.72) and s["spread"] == pytest.approx(0.02) and s["n"] == 3
    assert report.mean_spread([0.7])["spread"] == 0.0
    assert report.mean_spread([0.7, float("nan"), 0.8])["mean"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no finite value"):
        report.mean_spread([float("nan")])


def test_oracle_share() -> None:
    assert report.oracle_share(0.75, 0.85) == pytest.approx(0.25 / 0.35)
    assert report.oracle_share(0.85, 0.85) == pytest.approx(1.0)
    assert report.oracle_share(0.7, None) is None
    assert report.oracle_share(0.7, 0.5) is None


def test_aggregate_means_spreads_and_shares() -> None:
    runs = {"rankmixer": [record(0, 0.76, 0.80), record(1, 0.78, 0.82), record(2, 0.77, 0.81)]}
    out = report.aggregate(runs, TASKS, {"click": 0.85, "finish": 0.90})["rankmixer"]
    click = out["tasks"]["click"]
    assert click["auc"]["mean"] == pytest.approx(0.77) and click["auc"]["spread"] == pytest.approx(0.01)
    assert click["auc"]["values"] == [0.76, 0.78, 0.77]
    assert click["uauc"]["mean"] == pytest.approx(0.72)
    assert click["oracle_share"]["mean"] == pytest.approx(0.27 / 0.35)
    assert out["tasks"]["finish"]["oracle_share"]["mean"] == pytest.approx(0.31 / 0.40)
    assert out["seeds"] == [0, 1, 2] and out["params"] == 1000
    assert out["samples_per_s"]["mean"] == pytest.approx(1001.0)
    no_oracle = report.aggregate(runs, TASKS, None)["rankmixer"]
    assert "oracle_share" not in no_oracle["tasks"]["click"]


def models_for_checks() -> dict:
    runs = {
        "rankmixer": [record(0, 0.780, 0.800), record(1, 0.782, 0.802)],
        "dlrm_mlp": [record(0, 0.770, 0.790), record(1, 0.772, 0.792)],
        "dcnv2": [record(0, 0.785, 0.790), record(1, 0.787, 0.792)],  # beats dense on click
        "rankmixer_moe": [record(0, 0.7795, 0.790, act=0.25), record(1, 0.7805, 0.792, act=0.27)],
        "rankmixer_no_mixing": [record(0, 0.775, 0.801), record(1, 0.777, 0.803)],  # no cost on finish
    }
    return report.aggregate(runs, TASKS, None)


def test_quality_checks_statuses_and_gaps() -> None:
    checks = {(c["check"], c["task"]): c for c in report.quality_checks(models_for_checks(), TASKS)}
    assert checks[("rankmixer >= dlrm_mlp", "click")]["status"] == "PASS"
    assert checks[("rankmixer >= dlrm_mlp", "click")]["gap"] == pytest.approx(0.010)
    miss = checks[("rankmixer >= dcnv2", "click")]
    assert miss["status"] == "MISS" and miss["gap"] == pytest.approx(-0.005)
    assert checks[("rankmixer >= self_attention", "click")]["status"] == "N/A"
    moe = "moe within max(0.001, spread) of dense"
    # click: dense 0.781, moe 0.780 -> gap 0.001 <= max(0.001, pooled spread ~0.0012): PASS
    assert checks[(moe, "click")]["status"] == "PASS"
    assert "measured activation 0.260" in checks[(moe, "click")]["detail"]
    # finish: dense 0.801, moe 0.791 -> gap 0.010 > tolerance: MISS with the gap
    assert checks[(moe, "finish")]["status"] == "MISS" and checks[(moe, "finish")]["gap"] == pytest.approx(0.010)
    assert checks[("rankmixer_no_mixing costs AUC", "click")]["status"] == "PASS"
    assert checks[("rankmixer_no_mixing costs AUC", "finish")]["status"] == "MISS"
    assert checks[("rankmixer_shared_ffn costs AUC", "finish")]["status"] == "N/A"


def test_moe_tolerance_uses_pooled_seed_spread() -> None:
    runs = {
        "rankmixer": [record(0, 0.77, 0.80), record(1, 0.81, 0.82)],  # click std 0.0283, finish 0.0141
        "rankmixer_moe": [record(0, 0.775, 0.795), record(1, 0.775, 0.795)],  # std 0
    }
    checks = report.quality_checks(report.aggregate(runs, TASKS, None), TASKS)
    click, finish = [c for c in checks if c["check"].startswith("moe")]
    # click: gap 0.015 <= pooled spread sqrt(0.0283^2 / 2) = 0.02 (far above 0.001): PASS
    assert click["status"] == "PASS" and click["gap"] == pytest.approx(0.015)
    assert "tolerance 0.0200" in click["detail"]
    # finish: gap 0.015 > pooled spread 0.01: MISS
    assert finish["status"] == "MISS" and "tolerance 0.0100" in finish["detail"]


def test_run_stats_medians_after_warmup(tmp_path: Path) -> None:
    rows = [
        {"step": 10, "samples_per_s": 10.0, "mfu": 0.001},
        {"step": 20, "samples_per_s": 100.0, "mfu": 0.01, "moe/active_LT": [[0.2, 0.4]]},
        {"step": 30, "samples_per_s": 300.0, "mfu": 0.03, "moe/active_LT": [[0.2, 0.3], [0.3, 0.2]]},
        {"step": 30, "eval/click/auc": 0.7},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    st = report.run_stats(tmp_path, {"samples_per_s": 5.0, "mfu": 0.5})
    assert st["samples_per_s"] == pytest.approx(200.0) and st["mfu"] == pytest.approx(0.02)
    assert st["moe_activation"] == pytest.approx(0.25)
    empty = report.run_stats(tmp_path / "missing", {"samples_per_s": 5.0, "mfu": 0.5})
    assert empty == {"samples_per_s": 5.0, "mfu": 0.5, "moe_activation": None}


def test_oracle_aucs_match_the_teacher_report(tmp_path: Path) -> None:
    generate(tmp_path / "d", 4000, 1, 0, 0.25, 1024, "zstd")
    got = report.oracle_aucs(str(tmp_path / "d" / "eval"), TASKS)
    want = synth_report(tmp_path / "d" / "eval")
    assert got == pytest.approx({t: want[f"oracle_auc_{t}"] for t in TASKS})
    assert 0.6 < got["click"] < 1.0
    assert report.oracle_aucs(str(tmp_path / "d" / "eval"), ["click", "no_such_label"]) is None


def test_markdown_and_scaling_plot(tmp_path: Path) -> None:
    models = models_for_checks()
    points = [
        {
            "name": f"rm{i}",
            "family": "rankmixer",
            "params": 10**i,
            "flops_per_sample": 2 * 10**i,
            "auc": {"click": 0.7 + i / 100, "finish": 0.8},
        }
        for i in (5, 6)
    ] + [
        {
            "name": "dlrm",
            "family": "dlrm_mlp",
            "params": 10**5,
            "flops_per_sample": 2e5,
            "auc": {"click": 0.7, "finish": 0.79},
        }
    ]
    results = {
        "study": {
            "command": "python -m launch.study --smoke", "machine": "2 cores", "launcher": "python", "budget": "b",
            "data": {"train": "t", "eval": "e", "eval_rows": 1000}, "wall_s": 60.0, "runs_trained": 3,
            "runs_reused": 1, "runs_wall_s": 120.0, "lr_grid": [0.001, 0.003], "tune_seed": 0,
        },
        "tasks": TASKS,
        "oracle": {"click": 0.85, "finish": 0.9},
        "tuning": {"rankmixer": {"grid": {"lr0.001": 0.7, "lr0.003": 0.75}, "best_lr": 0.003, "steps": 3}},
        "models": models,
        "checks": report.quality_checks(models, TASKS),
        "scaling": points,
        "baselines": {
            "popularity": {"click": {"auc": 0.61}, "finish": {"auc": 0.6}},
            "item_ctr": {"click": {"auc": 0.65, "logloss": 0.55}, "finish": {"auc": 0.64, "logloss": 0.4}},
        },
    }  # fmt: skip
    models["dlrm_mlp"]["below_prior"] = 1
    md = report.markdown(results)
    assert "| *popularity* (baseline) | - | 0.6100 | - | - | 0.314 |" in md  # (0.61 - 0.5) / (0.85 - 0.5)
    assert "| *item_ctr* (baseline) | - | 0.6500 | - | 0.5500 |" in md
    assert "| dlrm_mlp (below an item prior in 1 of" in md
    assert "| rankmixer | 2 | 0.7810 ± 0.0014 |" in md
    assert "| rankmixer >= dcnv2 | click | MISS | -0.0050 |" in md
    assert "| rankmixer | 0.7000 | 0.7500 | lr0.003 | - |" in md
    assert "![scaling](scaling.png)" in md and "| rm6 | rankmixer | 1,000,000 |" in md
    png = report.scaling_plot(points, TASKS, tmp_path / "scaling.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no scaling points"):
        report.scaling_plot([], TASKS, tmp_path / "x.png")
    assert math.isfinite(results["study"]["wall_s"])
