"""Helpers of launch.study: its data (synthesis when missing, the teacher's oracle AUC, run costs), its
arithmetic (seed statistics, oracle shares, lr picking, the quality checks) and its outputs (markdown
report, scaling plot). No training here: the math is tested on summaries with known values.

    stats = mean_spread([0.71, 0.72, 0.73])            # {"mean": 0.72, "spread": 0.01, "n": 3}
    share = oracle_share(0.75, 0.85)                    # (0.75 - 0.5) / (0.85 - 0.5)
    models = aggregate(runs_by_arm, tasks, oracle)      # per arm: per task AUC/UAUC/logloss/share
    checks = quality_checks(models, tasks)              # PASS / MISS / N/A with the measured gaps

Spread is the sample standard deviation over seeds (ddof = 1; 0 with one seed).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

from config.job import dense_input_spec
from embeddings.regroup import sparse_dim, sparse_group_widths
from model.zoo import build_model
from pipeline.plan import resolve_files
from pipeline.tools.synth import auc, generate

# Roles of the arms in the quality targets (issue 8). An arm that did not run gives N/A, never PASS.
DENSE = "rankmixer"
MOE = "rankmixer_moe"
BASELINES = ("dlrm_mlp", "dcnv2", "self_attention")
ABLATIONS = ("rankmixer_no_mixing", "rankmixer_shared_ffn")
MOE_TOLERANCE = 0.001
METRICS = ("auc", "uauc", "logloss")


@dataclass
class SynthSpec:
    """[study.synth]: where and how `pipeline.tools.synth` writes the study's data when it is missing."""

    out: str = "data/study"
    """Output folder (train/ and eval/ are created); data.train must be `<out>/train` to generate."""
    rows: int = 1_200_000
    """Rows in total, train + eval."""
    files: int = 8
    """Train files."""
    seed: int = 0
    """Seed of the traffic and labels (the teacher is fixed)."""
    eval_fraction: float = 0.2
    """Share of the rows sent to eval/."""
    row_group_size: int = 16384
    """Rows per Parquet row group."""


def ensure_data(tree: dict[str, Any], synth: SynthSpec | None) -> None:
    """Generate the synthetic data if data.train is the [study.synth] output and missing."""
    train = Path(tree["data"]["train"])
    if train.exists() or "://" in tree["data"]["train"]:
        return
    if synth is None or train.resolve() != (Path(synth.out) / "train").resolve():
        where = "no [study.synth]" if synth is None else f"[study.synth] writes {synth.out}/train"
        raise FileNotFoundError(f"data.train = {train} not found ({where}); point data.train/data.eval at Parquet data")

    out = Path(synth.out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    res = generate(tmp, synth.rows, synth.files, synth.seed, synth.eval_fraction, synth.row_group_size, "zstd")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"[study] generated {res['train_rows']:,} train + {res['eval_rows']:,} eval rows in {out}", flush=True)


def train_flops_per_sample(cfg: Any) -> float:
    """Analytic training FLOPs per sample of the run's model (cfg: a JobConfig; MoE counted dense, as trained)."""

    f = cfg.features
    model = build_model(
        cfg.model,
        cfg.moe,
        sparse_dim=sparse_dim(f),
        dense=dense_input_spec(f),
        num_tasks=len(f.labels),
        sparse_groups=sparse_group_widths(f),
    )
    return float(model.flops_per_sample(training=True))


def mean_spread(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof = 1; 0.0 for a single value) of finite values.

    Raises:
        ValueError: no finite value.
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        raise ValueError(f"mean_spread: no finite value in {values!r}")
    spread = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return {"mean": statistics.fmean(xs), "spread": spread, "n": len(xs)}


def oracle_share(auc: float, oracle_auc: float | None) -> float | None:
    """Share of the oracle's lift over chance a model captures: (AUC - 0.5) / (oracle AUC - 0.5)."""
    if oracle_auc is None or not math.isfinite(oracle_auc) or oracle_auc <= 0.5:
        return None
    return (auc - 0.5) / (oracle_auc - 0.5)


def run_stats(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Throughput, MFU and MoE activation of one run from its metrics.jsonl.

    samples/s and MFU are the median over the logged windows after the first (the first holds the
    warm-up); the MoE activation is the mean of the last logged `moe/active_LT`. Falls back to the
    summary's last-window figures when the file has fewer than two windows.
    """
    sps, mfus, active = [], [], None
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "samples_per_s" in row:
                sps.append(float(row["samples_per_s"]))
                mfus.append(float(row.get("mfu", 0.0)))
            if isinstance(row.get("moe/active_LT"), list):
                flat = [float(v) for r in row["moe/active_LT"] for v in r]
                active = statistics.fmean(flat) if flat else None
    if len(sps) >= 2:
        sps, mfus = sps[1:], mfus[1:]
    return {
        "samples_per_s": statistics.median(sps) if sps else float(summary.get("samples_per_s", 0.0)),
        "mfu": statistics.median(mfus) if mfus else float(summary.get("mfu", 0.0)),
        "moe_activation": active,
    }


def aggregate(
    runs: dict[str, list[dict[str, Any]]], tasks: list[str], oracle: dict[str, float] | None
) -> dict[str, dict[str, Any]]:
    """Per arm: seed statistics of every eval metric and of the oracle share, and the run figures.

    Args:
        runs: arm -> one record per seed: {"seed", "lr", "summary" (summary.json), "stats" (run_stats)}.
        tasks: label columns, in order.
        oracle: task -> oracle AUC on the eval split, or None (data without oracle columns).

    Returns:
        arm -> {"seeds", "lr", "params", "flops_per_sample", "samples_per_s", "mfu", "moe_activation",
        "tasks": {task: {"auc"|"uauc"|"logloss"|"oracle_share": {"mean", "spread", "n", "values"}}},
        "below_prior": seeds whose summary says the model is below an item prior}.
    """
    out: dict[str, dict[str, Any]] = {}
    for arm, records in runs.items():
        if not records:
            continue
        per_task: dict[str, dict[str, Any]] = {}
        for task in tasks:
            row: dict[str, Any] = {}
            for metric in METRICS:
                vals = [r["summary"]["eval"][task][metric] for r in records]  # None: undefined (no user ids)
                finite = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
                row[metric] = (mean_spread(finite) | {"values": vals}) if finite else None
            shares = [oracle_share(float(r["summary"]["eval"][task]["auc"]), (oracle or {}).get(task)) for r in records]
            if all(s is not None for s in shares):
                row["oracle_share"] = mean_spread(shares) | {"values": shares}
            per_task[task] = row
        first = records[0]["summary"]
        active = [r["stats"]["moe_activation"] for r in records if r["stats"].get("moe_activation") is not None]
        out[arm] = {
            "seeds": [r["seed"] for r in records],
            "lr": records[0]["lr"],
            "params": int(first["params"]),
            "flops_per_sample": mean_spread([r["summary"]["flops_per_sample"] for r in records])["mean"],
            "samples_per_s": mean_spread([r["stats"]["samples_per_s"] for r in records]),
            "mfu": mean_spread([r["stats"]["mfu"] for r in records]),
            "moe_activation": statistics.fmean(active) if active else None,
            "tasks": per_task,
            "below_prior": sum(1 for r in records if r["summary"].get("below_prior")),
        }
    return out


def point_label(point: dict[str, Any]) -> str:
    """'lr0.001' or 'lr0.001__dropout0.1' (the run-id part of a tuning point; field names without section)."""
    parts = [f"lr{point['training.lr']:g}"]
    parts += [
        f"{k.rsplit('.', 1)[-1]}{v:g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}{v}"
        for k, v in point.items()
        if k != "training.lr"
    ]
    return "__".join(parts)


def tuning_score(summary: dict[str, Any], metric: str) -> tuple[float, str]:
    """(score, where): the run's best validation value of `metric` when it had validation rows (higher is
    better: a loss is negated), else the mean eval AUC over tasks."""
    valid = summary.get("valid")
    if valid and valid.get("best") is not None:
        lower = metric.rsplit("/", 1)[-1] in ("logloss", "ne")
        return (-valid["best"] if lower else valid["best"]), "valid"
    ev = summary["eval"]
    return sum(m["auc"] for m in ev.values()) / len(ev), "eval"


def pick_points(
    trials: list[tuple[str, dict[str, Any], dict[str, Any]]],
    arms: list[str],
    points: list[dict[str, Any]],
    steps: int,
    metric: str = "auc",
) -> dict[str, dict[str, Any]]:
    """The tuning table. trials: (arm, point, record) of the tuning runs (a point: {"training.lr": ..., ...}).

    Returns:
        arm -> {"grid": {"<point label>": score}, "best": point, "best_lr", "picked_on": "valid" | "eval",
        "steps"}; the earlier point wins a tie; an arm without trials (a one-point grid) gets points[0].
    """
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        scores, where = {}, "-"
        for a, point, rec in trials:
            if a == arm:
                scores[point_label(point)], where = tuning_score(rec["summary"], metric)
        best = max(points, key=lambda p: scores[point_label(p)]) if scores else points[0]
        out[arm] = {
            "grid": scores, "best": best, "best_lr": best["training.lr"], "picked_on": where,
            "steps": steps if scores else 0,
        }  # fmt: skip
    return out


def _check(name: str, task: str, gap: float | None, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "task": task, "status": "PASS" if ok else "MISS", "gap": gap, "detail": detail}


def _na(name: str, task: str, missing: str) -> dict[str, Any]:
    return {"check": name, "task": task, "status": "N/A", "gap": None, "detail": f"arm {missing!r} not run"}


def quality_checks(models: dict[str, dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    """The issue's targets on mean eval AUC; gaps are dense minus the other arm (positive = dense ahead).

    * dense >= baseline: gap >= 0, for DLRM-MLP, DCNv2 and self-attention mixing.
    * MoE within tolerance: dense - MoE <= max(0.001, pooled seed spread of the two arms), one-sided
      (a MoE ahead of dense passes); the pooled spread is sqrt((s_dense^2 + s_moe^2) / 2).
    * ablation costs AUC: gap > 0 for RankMixer without token mixing and with one shared FFN.
    """
    checks: list[dict[str, Any]] = []
    dense = models.get(DENSE)
    for task in tasks:

        def auc(arm: str, task: str = task) -> dict[str, float]:
            return models[arm]["tasks"][task]["auc"]

        for b in BASELINES:
            name = f"rankmixer >= {b}"
            if dense is None or b not in models:
                checks.append(_na(name, task, DENSE if dense is None else b))
                continue
            gap = auc(DENSE)["mean"] - auc(b)["mean"]
            checks.append(_check(name, task, gap, gap >= 0.0, f"{auc(DENSE)['mean']:.4f} vs {auc(b)['mean']:.4f}"))
        name = "moe within max(0.001, spread) of dense"
        if dense is None or MOE not in models:
            checks.append(_na(name, task, DENSE if dense is None else MOE))
        else:
            d, m = auc(DENSE), auc(MOE)
            tol = max(MOE_TOLERANCE, math.sqrt((d["spread"] ** 2 + m["spread"] ** 2) / 2.0))
            gap = d["mean"] - m["mean"]
            ratio = models[MOE]["params"] / max(dense["params"], 1)
            act = models[MOE].get("moe_activation")
            detail = (
                f"dense {d['mean']:.4f}, moe {m['mean']:.4f}, tolerance {tol:.4f}; params moe/dense {ratio:.3f}"
                + (f"; measured activation {act:.3f}" if act is not None else "")
            )
            checks.append(_check(name, task, gap, gap <= tol, detail))
        for a in ABLATIONS:
            name = f"{a} costs AUC"
            if dense is None or a not in models:
                checks.append(_na(name, task, DENSE if dense is None else a))
                continue
            gap = auc(DENSE)["mean"] - auc(a)["mean"]
            checks.append(_check(name, task, gap, gap > 0.0, f"{auc(DENSE)['mean']:.4f} vs {auc(a)['mean']:.4f}"))
    return checks


# ------------------------------------------------------------------------------------ oracle, context lines


def oracle_aucs(eval_uri: str, tasks: list[str]) -> dict[str, float] | None:
    """AUC of the teacher's `oracle_p_<task>` columns on the eval split (pipeline.tools.synth data); None when
    the data has no such columns (a user's own Parquet)."""

    fs, files = resolve_files(eval_uri)
    cols = [c for t in tasks for c in (t, f"oracle_p_{t}")]
    if not files or any(c not in pq.read_schema(files[0], filesystem=fs).names for c in cols):
        return None
    tables = [pq.read_table(f, columns=cols, filesystem=fs) for f in files]
    out = {}
    for t in tasks:
        y = np.concatenate([tb.column(t).to_numpy() for tb in tables])
        p = np.concatenate([tb.column(f"oracle_p_{t}").to_numpy() for tb in tables])
        out[t] = auc(p, y)
    return out


def machine_line() -> str:
    """Cores, CPU model, OS and torch version of this machine."""
    import torch  # noqa: PLC0415

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()}; torch {torch.__version__}"


def launcher_line(launcher: str, jobs: int, nproc: int) -> str:
    """How each run was launched (study.launcher, study.jobs, study.nproc)."""
    if launcher == "python":
        threads = max(1, (os.cpu_count() or 1) // jobs)
        return f"python -m launch.train (world size 1), {jobs} run(s) at a time, {threads} thread(s) each"
    return f"launch/train.sh ({nproc} processes), {jobs} run(s) at a time"


def budget_line(steps_line: str, grid: list[float], seeds: list[int], tune_seed: int, tune_steps: int, cfg: Any) -> str:
    """The tuning budget every model got, in words (cfg: the base JobConfig)."""
    t = cfg.training
    metric = t.early_stopping_metric
    metric = metric if "/" in metric else f"{metric} (mean over tasks)"
    has_valid = cfg.data.valid or cfg.data.valid_fraction > 0
    on = f"its best validation {metric}" if has_valid else "mean eval AUC over tasks"
    if len(grid) == 1:
        return f"{steps_line}; fixed dense lr {grid[0]:g} (no tuning); seeds {seeds}"
    return (
        f"{steps_line}; dense lr grid {grid} ({t.optimizer}, {t.warmup_steps} warmup steps, {t.lr_decay} decay; "
        f"embedding lr fixed at {cfg.embeddings.lr:g}) picked per model by {on} at seed "
        f"{tune_seed} with {tune_steps} steps (the same schedule, compressed); then seeds {seeds} at the picked lr"
    )


def scaling_point(name: str, family: str, run_id: str, summary: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """One point of the scaling sweep from its run's summary.json."""
    return {
        "name": name,
        "family": family,
        "run_id": run_id,
        "params": int(summary["params"]),
        "flops_per_sample": float(summary["flops_per_sample"]),
        "auc": {t: float(summary["eval"][t]["auc"]) for t in tasks},
    }


# ------------------------------------------------------------------------------------ markdown


def _pm(s: dict[str, float] | None, digits: int = 4) -> str:
    if s is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['spread']:.{digits}f}"


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def markdown(results: dict[str, Any]) -> str:
    """results.json as a report: settings, per-task quality table, cost table, checks, scaling."""
    st, tasks, models, oracle = results["study"], results["tasks"], results["models"], results.get("oracle")
    lines = [
        "# RankMixer study",
        "",
        f"Command: `{st['command']}`  ",
        f"Machine: {st['machine']}  ",
        f"Launcher: {st['launcher']}  ",
        f"Data: train `{st['data']['train']}`, eval `{st['data']['eval']}` ({st['data']['eval_rows']:,} eval rows)  ",
        f"Budget: {st['budget']}  ",
        f"Wall time of this invocation: {st['wall_s'] / 60:.1f} min ({st['runs_trained']} runs trained, "
        f"{st['runs_reused']} reused); all runs together: {st['runs_wall_s'] / 60:.1f} min of run wall time, "
        f"{st.get('runs_cpu_s', 0.0) / 60:.1f} CPU min",
        "",
        "All figures below come from the runs of this study (mean ± sample std over seeds).",
        "",
    ]
    if oracle:
        lines += ["Oracle AUC (teacher's oracle_p on the eval split): "]
        lines[-1] += ", ".join(f"{t} {oracle[t]:.4f}" for t in tasks) + "  "
        lines += [""]
    for task in tasks:
        lines += [
            f"## {task}",
            "",
            "| model | seeds | AUC | UAUC | logloss | share of oracle lift |",
            "|---|---|---|---|---|---|",
        ]
        for arm, m in models.items():
            r = m["tasks"][task]
            below = (
                f" (below an item prior in {m['below_prior']} of {len(m['seeds'])} seeds)"
                if m.get("below_prior")
                else ""
            )
            lines.append(
                f"| {arm}{below} | {len(m['seeds'])} | {_pm(r['auc'])} | {_pm(r['uauc'])} | {_pm(r['logloss'])} "
                f"| {_pm(r.get('oracle_share'), 3)} |"
            )
        for name, per_task in results.get("baselines", {}).items():  # fit on train, scored on eval: no seeds
            b = per_task.get(task, {})
            share = oracle_share(b["auc"], (oracle or {}).get(task)) if "auc" in b else None
            logloss = f"{b['logloss']:.4f}" if "logloss" in b else "-"
            share_s = f"{share:.3f}" if share is not None else "-"
            lines.append(f"| *{name}* (baseline) | - | {b.get('auc', float('nan')):.4f} | - | {logloss} | {share_s} |")
        lines.append("")
    lines += [
        "## Cost",
        "",
        "| model | lr | params | FLOPs/sample (fwd) | train samples/s | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for arm, m in models.items():
        mfu = m["mfu"]
        lines.append(
            f"| {arm} | {m['lr']:g} | {m['params']:,} | {_si(m['flops_per_sample'])} "
            f"| {m['samples_per_s']['mean']:,.0f} ± {m['samples_per_s']['spread']:,.0f} "
            f"| {100 * mfu['mean']:.2f}% ± {100 * mfu['spread']:.2f}% |"
        )
    labels = st.get("points") or [f"lr{lr:g}" for lr in st["lr_grid"]]
    lines += ["", "## Tuning", "", "| model | " + " | ".join(labels) + " | picked | on |"]
    lines.append("|---|" + "---|" * (len(labels) + 2))
    for arm, t in results.get("tuning", {}).items():
        cells = [f"{t['grid'][label]:.4f}" if label in t["grid"] else "-" for label in labels]
        picked = next((label for label in labels if t["grid"].get(label) == max(t["grid"].values(), default=None)), "-")
        lines.append(
            f"| {arm} | " + " | ".join(cells) + f" | {picked if t['grid'] else 'fixed'} | {t.get('picked_on', '-')} |"
        )
    lines += ["", "## Quality targets", "", "| check | task | status | gap (dense - other) | detail |"]
    lines.append("|---|---|---|---|---|")
    for c in results["checks"]:
        gap = "n/a" if c["gap"] is None else f"{c['gap']:+.4f}"
        lines.append(f"| {c['check']} | {c['task']} | {c['status']} | {gap} | {c['detail']} |")
    if results.get("scaling"):
        lines += ["", "## Scaling (seed " + str(st["tune_seed"]) + ")", "", "![scaling](scaling.png)", ""]
        lines += ["| point | family | params | FLOPs/sample | " + " | ".join(f"AUC {t}" for t in tasks) + " |"]
        lines.append("|---|---|---|---|" + "---|" * len(tasks))
        for p in results["scaling"]:
            aucs = " | ".join(f"{p['auc'][t]:.4f}" for t in tasks)
            lines.append(f"| {p['name']} | {p['family']} | {p['params']:,} | {_si(p['flops_per_sample'])} | {aucs} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, results: dict[str, Any]) -> None:
    """OUT/results.json, OUT/results.md and (with scaling points) OUT/scaling.png."""
    if results.get("scaling"):
        scaling_plot(results["scaling"], results["tasks"], out / "scaling.png")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))


def scaling_plot(points: list[dict[str, Any]], tasks: list[str], path: Path) -> Path:
    """AUC against params and against forward FLOPs per sample (log x), one line per family, one row
    of panels per task (like Figure 2 of the paper)."""
    if not points:
        raise ValueError(f"scaling_plot: no scaling points to draw into {path}")
    fig = Figure(figsize=(10, 3.6 * len(tasks)))
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    families = sorted({p["family"] for p in points})
    for row, task in enumerate(tasks):
        for col, (key, label) in enumerate((("params", "dense parameters"), ("flops_per_sample", "FLOPs / sample"))):
            ax = axes[row][col]
            for fam in families:
                pts = sorted((p[key], p["auc"][task]) for p in points if p["family"] == fam)
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=fam)
            ax.set_xscale("log")
            # 1-2-5 ticks in engineering units: a sweep often spans less than a decade
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(EngFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set(xlabel=label, ylabel=f"eval AUC ({task})", title=f"{task}: AUC vs {label}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize="small")
    fig.tight_layout()
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
