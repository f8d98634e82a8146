"""The quality and scaling study: every zoo model on the same data, seeds and tuning budget.

    python -m launch.study --config configs/study.toml [--smoke] [--out study/] [--data.train DIR ...]

The config is a job config (the base of every run) plus a top-level `[study]` table, stripped here
before `config.job.load_config` sees the rest: seeds, tune_seed, lr_grid, tune_fraction, launcher
("python" | "torchrun"), nproc, jobs (runs at a time), keep_checkpoints; [study.synth] (pipeline.tools.synth
writes the data when data.train is `<out>/train` and missing); [study.arms.NAME] (job overrides of one
model of the main table); [study.scaling.NAME] (a sweep point: overrides + `family` + `lr_from`, or
`same_as = ARM`); [study.smoke] (overrides of all that for --smoke, `job` = overrides of the job).

Phase 1 tunes: every arm at every lr of the grid, seed tune_seed, tune_fraction of the pass; the best
mean eval AUC over tasks picks the lr. Phase 2: every arm at its lr for every seed (one pass each), and
the sweep. Each run is `python -m launch.train` (or launch/train.sh) in a subprocess in OUT/runs/<id>/;
a run whose summary.json exists is reused. Then OUT/results.json, results.md, scaling.png.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from config import ConfigError, JobConfig, load_config
from pipeline.plan import carve_tail, plan_dataset
from schema.tree import parse_value, resolve, set_dotted
from study import report

REPO = Path(__file__).resolve().parents[1]


class StudyError(RuntimeError):
    """A study problem: names the config key, file or run directory."""


@dataclass
class StudySpec:
    """The `[study]` table."""

    base: str = ""
    """A job TOML (relative to the study file) the study's own job tables are merged onto; empty: the
    study file alone is the base job."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of every arm (initialisation and shuffling)."""
    tune_seed: int = 0
    """Seed of the tuning runs and of the scaling sweep; one of `seeds`."""
    lr_grid: list[float] = field(default_factory=lambda: [0.002])
    """Dense peak learning rates tried for every arm (one value and no `grid`: no tuning)."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """More config fields tuned jointly with lr_grid (their product), e.g. {"model.dropout" = [0.0, 0.1]}.
    Points are picked per arm on the validation metric (training.early_stopping_metric) when the runs have
    validation rows, else on the mean eval AUC over tasks."""
    tune_fraction: float = 1.0
    """Share of the pass a tuning run trains (1.0: tuning runs are the tune_seed runs themselves)."""
    launcher: str = "python"
    """'python' (python -m launch.train, world size 1) or 'torchrun' (launch/train.sh, `nproc` ranks)."""
    nproc: int = 2
    """Processes per run under torchrun (data.batch_size is the global batch, split over them)."""
    jobs: int = 1
    """Runs at a time; each gets cores / jobs threads."""
    keep_checkpoints: bool = False
    """Keep each run's final checkpoint (false: deleted once summary.json is written)."""
    synth: report.SynthSpec | None = None
    """[study.synth]: how to generate missing synthetic data."""
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    """[study.arms.NAME]: job overrides per model of the main table."""
    scaling: dict[str, dict[str, Any]] = field(default_factory=dict)
    """[study.scaling.NAME]: the sweep points."""
    wandb: bool = False
    """Log every run to W&B (metrics.wandb on) in one group named after the study's output folder, job
    type 'study', tagged with its arm; W&B settings never make a finished run look like another job."""

    @property
    def world_size(self) -> int:
        return self.nproc if self.launcher == "torchrun" else 1


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `over` wins."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_study(table: dict[str, Any], where: str) -> StudySpec:
    """Build a StudySpec from the `[study]` table; unknown keys and bad values name `where`."""
    names = set(StudySpec.__dataclass_fields__)
    for k in table:
        if k not in names:
            raise StudyError(f"{where}: unknown key 'study.{k}'; valid keys: {', '.join(sorted(names))}")
    t = dict(table)
    if "synth" in t:
        bad = set(t["synth"]) - set(report.SynthSpec.__dataclass_fields__)
        if bad:
            valid = ", ".join(report.SynthSpec.__dataclass_fields__)
            raise StudyError(f"{where}: unknown key(s) study.synth.{sorted(bad)}; valid keys: {valid}")
        t["synth"] = report.SynthSpec(**t["synth"])
    spec = StudySpec(**t)
    if not all(type(x) is int for x in spec.seeds) or not all(type(x) in (int, float) for x in spec.lr_grid):
        raise StudyError(f"{where}: study.seeds must be integers and study.lr_grid numbers")
    if spec.launcher not in ("python", "torchrun"):
        raise StudyError(f"{where}: study.launcher = {spec.launcher!r}; expected 'python' or 'torchrun'")
    if not spec.seeds or spec.tune_seed not in spec.seeds:
        raise StudyError(f"{where}: study.tune_seed ({spec.tune_seed}) must be one of study.seeds {spec.seeds}")
    if not spec.lr_grid or any(lr <= 0 for lr in spec.lr_grid):
        raise StudyError(f"{where}: study.lr_grid must be a non-empty list of positive numbers, got {spec.lr_grid}")
    for key, values in spec.grid.items():
        if key == "training.lr" or not isinstance(values, list) or not values:
            raise StudyError(f"{where}: study.grid.{key} must be a non-empty list (training.lr is study.lr_grid)")
    if not 0.0 < spec.tune_fraction <= 1.0 or spec.jobs < 1 or spec.nproc < 1:
        raise StudyError(f"{where}: need 0 < study.tune_fraction <= 1, study.jobs >= 1 and study.nproc >= 1")
    if not spec.arms:
        raise StudyError(f"{where}: no [study.arms.NAME] tables: nothing to train")
    for name, sc in spec.scaling.items():
        if "same_as" in sc and sc["same_as"] not in spec.arms:
            raise StudyError(f"{where}: study.scaling.{name}.same_as = {sc['same_as']!r} is not an arm of [study.arms]")
    return spec


def load_study(path: Path, smoke: bool, overrides: list[str], out: Path) -> tuple[StudySpec, JobConfig]:
    """Read the study file: (spec, the validated base JobConfig of every run); writes OUT/job_base.toml."""
    if not path.is_file():
        raise StudyError(f"study config not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{path}: invalid TOML: {e}") from None
    if "study" not in raw:
        raise StudyError(f"{path}: no [study] table (models, seeds, lr grid of the study)")
    study = raw.pop("study")
    smoke_table = study.pop("smoke", None)
    if smoke:
        if smoke_table is None:
            raise StudyError(f"{path}: --smoke needs a [study.smoke] table")
        smoke_table = dict(smoke_table)
        raw = merge(raw, smoke_table.pop("job", {}))
        study = merge(study, smoke_table)
    spec = parse_study(study, str(path))
    if spec.base:
        base_path = path.parent / spec.base
        try:
            base_tree = tomllib.loads(base_path.read_text())
            base_tree.pop("study", None)  # a study file can be the base: its job part only
            raw = merge(base_tree, raw)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise StudyError(f"{path}: study.base = {spec.base!r}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    base_file = out / "job_base.toml"
    base_file.write_text(tomli_w.dumps(raw))
    try:
        cfg = load_config(["--config", str(base_file), *overrides], world_size=spec.world_size)
    except ConfigError as e:
        raise StudyError(f"{path} (job part, see {base_file}): {e}") from None
    return spec, cfg


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`--grid SECTION.FIELD=V1,V2` items -> {"section.field": [typed values]} (StudyError naming the item)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, _, values = item.partition("=")
        try:
            tp = resolve(JobConfig, key)
            grid[key] = [parse_value(v.strip(), tp, key) for v in values.split(",") if v.strip()]
        except ConfigError as e:
            raise StudyError(f"--grid {item!r}: {e}") from None
        if not grid[key] or key == "training.lr":
            raise StudyError(f"--grid {item!r}: expected SECTION.FIELD=V1,V2 (training.lr is --lr-grid)")
    return grid


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    """Every tuning point: {"training.lr": lr, **one value of every study.grid field}, lr varying fastest last."""
    keys = list(spec.grid)
    points = []
    for lr in spec.lr_grid:
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            points.append({"training.lr": lr, **dict(zip(keys, values))})
    return points


@dataclass
class Run:
    """One training job of the study."""

    run_id: str
    arm: str
    seed: int
    lr: float
    steps: int
    tree: dict[str, Any]
    cost: float = 0.0
    """Training FLOPs of the whole run (set by validate_run): the longest runs start first."""


def make_run(
    base: dict, name: str, over: dict, seed: int, point: dict[str, Any], steps: int, out: Path, spec: StudySpec
) -> Run:
    """The job tree of one run: base + arm overrides + the tuning point (lr and grid fields) + seed, steps
    and its run directory."""
    over = {k: v for k, v in over.items() if k not in ("family", "lr_from", "same_as")}
    lr = float(point["training.lr"])
    run_id = f"{name}__s{seed}__{report.point_label(point)}__n{steps}"
    tree = merge(copy.deepcopy(base), over)  # base's sub-tables must not be shared between runs
    for key, value in point.items():
        if key != "training.lr":
            set_dotted(tree, key, value)
    tree["training"] |= {"seed": seed, "lr": lr, "steps": steps, "name": run_id, "resume": "never"}
    tree["training"]["output_dir"] = str((out / "runs" / run_id).resolve())
    if spec.wandb:
        tree.setdefault("metrics", {})
        tree["metrics"] |= {
            "wandb": True,
            "wandb_group": out.resolve().name,
            "wandb_job_type": "study",
            "wandb_tags": [name],
        }
    if spec.launcher == "torchrun":
        bs = tree["data"]["batch_size"]
        if bs % spec.nproc:
            raise StudyError(f"data.batch_size ({bs}) is the global batch: it must divide by study.nproc")
        tree["data"]["batch_size"] = bs // spec.nproc
    return Run(run_id, name, seed, lr, steps, tree)


def validate_run(run: Run, spec: StudySpec, scratch: Path) -> None:
    """load_config on the run's tree (before anything trains; errors name the run), and its cost."""
    scratch.write_text(tomli_w.dumps(run.tree))
    try:
        cfg = load_config(["--config", str(scratch)], world_size=spec.world_size)
    except ConfigError as e:
        raise StudyError(f"study run {run.run_id} (arm {run.arm!r}): {e}") from None
    run.cost = report.train_flops_per_sample(cfg) * run.steps * cfg.data.batch_size * spec.world_size


def _job(tree: dict[str, Any]) -> dict[str, Any]:
    """A job tree as TOML reads it back, without its (relocatable) output_dir: what reuse compares."""
    out = tomllib.loads(tomli_w.dumps(tree))
    out["training"].pop("output_dir", None)
    for key in [k for k in out.get("metrics", {}) if k.startswith("wandb")]:  # tracking, not training
        out["metrics"].pop(key)
    return out


def _same_job(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a finished run was trained from this job: every setting both trees have is equal (a setting
    on one side only was added or removed by another version of this code, whose default keeps the old
    behaviour, as on resume)."""

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    a, b = flat(_job(stored)), flat(_job(wanted))
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def execute(run: Run, spec: StudySpec) -> tuple[dict[str, Any], bool]:
    """Train one run in a subprocess unless OUT/runs/<id>/summary.json exists; (record, trained)."""
    run_dir = Path(run.tree["training"]["output_dir"])
    summary_path = run_dir / "summary.json"
    trained = not summary_path.exists()
    stored = run_dir / "job.toml"
    if not trained and stored.exists() and not _same_job(tomllib.loads(stored.read_text()), run.tree):
        raise StudyError(f"{run_dir} was trained from another config ({stored} differs): delete it or change --out")
    if trained:
        shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run restarts from scratch
        run_dir.mkdir(parents=True)
        stored.write_text(tomli_w.dumps(run.tree))
        cores = os.cpu_count() or 1
        env = dict(os.environ, PYTHONPATH=str(REPO), TORCH_EXTENSIONS_DIR=str(REPO / ".build" / "torch_extensions"))
        if spec.launcher == "torchrun":
            cmd = ["bash", str(REPO / "launch" / "train.sh"), str(stored)]
            env |= {"NPROC_PER_NODE": str(spec.nproc), "MAX_RESTARTS": "0"}
            env["OMP_NUM_THREADS"] = str(max(1, cores // (spec.nproc * spec.jobs)))
        else:
            cmd = [sys.executable, "-m", "launch.train", "--config", str(stored)]
            env |= {"OMP_NUM_THREADS": str(max(1, cores // spec.jobs)), "WORLD_SIZE": "1"}
        t0 = time.perf_counter()
        with open(run_dir / "train.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)  # CPU seconds of the run and its children
        rc, wall, cpu = os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_utime + usage.ru_stime
        proc.returncode = rc
        if rc != 0 or not summary_path.exists():
            tail = "\n".join((run_dir / "train.log").read_text().splitlines()[-5:])
            raise StudyError(f"run {run.run_id} failed (exit {rc}); log {run_dir / 'train.log'}:\n{tail}")
        (run_dir / "study_run.json").write_text(json.dumps({"cmd": cmd, "proc_wall_s": wall, "cpu_s": cpu}) + "\n")
        if not spec.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    summary = json.loads(summary_path.read_text())
    side = json.loads((run_dir / "study_run.json").read_text()) if (run_dir / "study_run.json").exists() else {}
    wall, cpu = side.get("proc_wall_s", float(summary.get("wall_s", 0.0))), side.get("cpu_s", 0.0)
    record = {"seed": run.seed, "lr": run.lr, "summary": summary, "stats": report.run_stats(run_dir, summary)}
    return record | {"proc_wall_s": wall, "cpu_s": cpu, "run_id": run.run_id}, trained


def execute_all(runs: list[Run], spec: StudySpec, counter: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Run (or reuse) every run, `spec.jobs` at a time; run_id -> record. Failures are reported together."""
    unique = sorted({r.run_id: r for r in runs}.values(), key=lambda r: -r.cost)
    results: dict[str, dict[str, Any]] = {}
    errors: list[str] = []

    def one(run: Run) -> None:
        try:
            rec, trained = execute(run, spec)
        except StudyError as e:
            errors.append(str(e))
            return
        counter["trained" if trained else "reused"] += 1
        results[run.run_id] = rec
        aucs = " ".join(f"{t} {m['auc']:.4f}" for t, m in rec["summary"]["eval"].items())
        verb = f"trained in {rec['proc_wall_s']:.0f} s ({rec['cpu_s']:.0f} CPU s)" if trained else "reused"
        print(f"[study] {run.run_id}: {verb} | auc {aucs}", flush=True)

    with ThreadPoolExecutor(max_workers=spec.jobs) as pool:
        list(pool.map(one, unique))
    if errors:
        raise StudyError(f"{len(errors)} run(s) failed (rerun resumes; finished runs are kept):\n" + "\n".join(errors))
    return results


def _subset(table: dict[str, Any], names: str, flag: str, config: str) -> dict[str, Any]:
    """The entries of `table` named in the comma list `names` ('' keeps all, 'none' keeps none)."""
    if not names:
        return table
    keep = [] if names == "none" else names.split(",")
    if unknown := [m for m in keep if m not in table]:
        raise StudyError(f"{flag}: unknown name(s) {unknown}; {config} has: {', '.join(table)}")
    return {k: v for k, v in table.items() if k in keep}


def plan_scaling(
    base: dict, spec: StudySpec, tuning: dict[str, dict[str, Any]], steps: int, out: Path
) -> tuple[list[Run], list[tuple[str, str, str]]]:
    """Runs of the sweep and its points (name, family, run_id); a `same_as` point reuses its arm's run at
    tune_seed, and points whose arm (lr_from) is not part of this invocation are left out."""
    runs, points = [], []
    for name, sc in spec.scaling.items():
        ref = sc.get("same_as")
        family = sc.get("family", ref or sc.get("model", {}).get("name", name))
        lr_from = ref or sc.get("lr_from", family)
        if lr_from not in spec.arms:
            continue
        point = tuning[lr_from]["best"]
        run = make_run(
            base, ref or f"scale_{name}", spec.arms[ref] if ref else sc, spec.tune_seed, point, steps, out, spec
        )
        runs += [] if ref else [run]
        points.append((name, family, run.run_id))
    return runs, points


def run_study(args: argparse.Namespace, overrides: list[str], argv: list[str]) -> dict[str, Any]:
    """Run (or resume) the study of `launch.study`'s parsed arguments; returns results.json as a dict."""
    t_start, out = time.perf_counter(), Path(args.out or ("study/smoke" if args.smoke else "study"))
    spec, cfg = load_study(Path(args.config), args.smoke, overrides, out)
    base = cfg.to_dict()
    spec.arms = _subset(spec.arms, args.models, "--models", args.config)
    if args.seeds:
        spec.seeds = [int(s) for s in args.seeds.split(",")]
        spec.tune_seed = spec.tune_seed if spec.tune_seed in spec.seeds else spec.seeds[0]
    spec.lr_grid = [float(x) for x in args.lr_grid.split(",")] if args.lr_grid else spec.lr_grid
    spec.grid |= parse_grid(args.grid)
    spec.jobs = args.jobs or spec.jobs
    spec.scaling = _subset(spec.scaling, args.scaling, "--scaling", args.config)
    report.ensure_data(base, spec.synth)
    tasks = list(cfg.features.labels)

    train_plan = plan_dataset(cfg.data.train, cfg.data, cfg.features)
    valid_rows = 0
    if cfg.data.valid_fraction > 0:  # the carved rows are never trained on: a pass is over the rest
        train_plan, valid_plan = carve_tail(train_plan, cfg.data.valid_fraction)
        valid_rows = valid_plan.num_rows
    elif cfg.data.valid:
        valid_rows = plan_dataset(cfg.data.valid, cfg.data, cfg.features).num_rows
    train_rows = train_plan.num_rows
    eval_rows = plan_dataset(cfg.data.eval, cfg.data, cfg.features).num_rows
    full = args.steps or cfg.training.steps or cfg.training.epochs * (train_rows // cfg.data.batch_size)
    tune_steps = max(1, round(spec.tune_fraction * full))
    oracle = report.oracle_aucs(cfg.data.eval, tasks)

    # Phase 1: tuning (skipped when the grid has one point).
    counter = {"trained": 0, "reused": 0}
    scratch = out / ".validate.toml"
    points = grid_points(spec)
    tune_runs, run_points = [], {}
    for arm, over in spec.arms.items():
        for point in points if len(points) > 1 else []:
            run = make_run(base, arm, over, spec.tune_seed, point, tune_steps, out, spec)
            tune_runs.append(run)
            run_points[run.run_id] = point
    for r in tune_runs:
        validate_run(r, spec, scratch)
    tuned = execute_all(tune_runs, spec, counter)
    trials = [(r.arm, run_points[r.run_id], tuned[r.run_id]) for r in tune_runs]
    tuning = report.pick_points(trials, list(spec.arms), points, tune_steps, cfg.training.early_stopping_metric)

    # Phase 2: every seed at the picked point, and the scaling points.
    main_runs = [
        make_run(base, arm, over, seed, tuning[arm]["best"], full, out, spec)
        for arm, over in spec.arms.items()
        for seed in spec.seeds
    ]
    scale_runs, scale_meta = plan_scaling(base, spec, tuning, full, out)
    for r in main_runs + scale_runs:
        validate_run(r, spec, scratch)
    scratch.unlink(missing_ok=True)
    done = execute_all(scale_runs + main_runs, spec, counter)

    by_arm = {arm: [done[r.run_id] for r in main_runs if r.arm == arm] for arm in spec.arms}
    models = report.aggregate(by_arm, tasks, oracle)
    scaling = [report.scaling_point(n, fam, rid, done[rid]["summary"], tasks) for n, fam, rid in scale_meta]
    all_recs = list(tuned.values()) + list(done.values())
    per_pass = max(1, train_rows // cfg.data.batch_size)
    passes = "one pass" if full == per_pass else f"{full / per_pass:.3g} passes"
    steps_line = f"{passes} = {full} steps x global batch {cfg.data.batch_size} over {train_rows:,} train rows per run"
    if valid_rows:
        steps_line += f" ({valid_rows:,} validation rows apart)"
    results = {
        "study": {
            "command": "python -m launch.study " + " ".join(argv),
            "machine": report.machine_line(),
            "launcher": report.launcher_line(spec.launcher, spec.jobs, spec.nproc),
            "budget": report.budget_line(steps_line, spec.lr_grid, spec.seeds, spec.tune_seed, tune_steps, cfg),
            "lr_grid": spec.lr_grid,
            "grid": spec.grid,
            "points": [report.point_label(p) for p in points],
            "seeds": spec.seeds,
            "tune_seed": spec.tune_seed,
            "steps": full,
            "tune_steps": tune_steps,
            "data": {"train": cfg.data.train, "eval": cfg.data.eval, "train_rows": train_rows, "eval_rows": eval_rows},
            "wall_s": time.perf_counter() - t_start,
            "runs_trained": counter["trained"],
            "runs_reused": counter["reused"],
            "runs_wall_s": sum(r["proc_wall_s"] for r in all_recs),
            "runs_cpu_s": sum(r["cpu_s"] for r in all_recs),
        },
        "tasks": tasks,
        "oracle": oracle,
        "tuning": tuning,
        "models": models,
        "baselines": baselines_of(by_arm),
        "checks": report.quality_checks(models, tasks),
        "scaling": scaling,
    }
    report.write_outputs(out, results)
    print(f"[study] wrote {out}/results.json and results.md ({results['study']['wall_s'] / 60:.1f} min)", flush=True)
    return results


def baselines_of(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """The trivial baselines of the eval split (`metrics.baselines`: global prior, item popularity, item CTR),
    fit on the training rows: the same data for every run, so the first run's summary carries them."""
    for records in runs.values():
        for r in records:
            base = r["summary"].get("baselines", {}).get("eval")
            if base:
                return base
    return {}
