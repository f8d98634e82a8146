"""Input pipeline throughput: rows per CPU-second to ready KJT batches, against raw pyarrow decode.

    python -m bench.pipeline [--json FILE] [--rows N] [--workers 0,1,2] [--data DIR]
    python -m bench.pipeline --memory --budget-mb 64     # optional: peak RSS on 10x the budget

Default run: writes a synthetic log (`pipeline.tools.synth`, default 2M rows, 16 files, row groups of
16384, zstd) into a temporary folder, then on the same files:
1. raw pyarrow decode: `ParquetFile.iter_batches(columns=...)` of the columns the pipeline reads,
   default settings, one process, every file; rows / CPU-second of this process.
2. this pipeline: ParquetLoader (configs/default.toml schema and batch size, shuffle on, one rank)
   up to ready `Batch`es (KJT + dense + labels), for each reader count in --workers; CPU time is
   RUSAGE_SELF + RUSAGE_CHILDREN: every thread of this process (the read-ahead thread included) and
   the reader processes, which are joined at the end of the epoch, so they count.
Each measurement is the best of --repeats (the machine is shared); a warm-up pass first fills the
page cache. JSON keys: pyarrow_rows_per_cpu_s, pipeline_rows_per_cpu_s (num_workers of
configs/default.toml), ratio_vs_pyarrow, plus per-worker-count figures, and `checksums`: the CPU cost
per row of verifying the Parquet page checksums the synthetic files carry (`data.verify_checksums` on
vs off, 0 workers, passes alternated).

--memory streams (num_workers 0 and 1, in a fresh process each) a dataset whose decoded size is 10x
--budget-mb and reports the peak memory growth (proportional set size of the trainer process plus
its reader processes, sampled every 16 batches) over the idle process (torch, torchrec and the plan
loaded), which must stay under the budget. It does not depend on the dataset size: one shuffle
window, `data.prefetch_row_groups` decoded row groups and the id memo tables (8 MiB per vocab size,
built in the trainer and shared with forked readers), plus the allocators' retained pages; with
reader processes also their ring of shared-memory blocks and the copy-on-write copies of the
trainer's Python heap that a forked process touches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from config import load_config
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset
from pipeline.tools.synth import generate

CONFIG = "configs/default.toml"


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (user + system)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def pyarrow_pass(files: list[str], columns: list[str]) -> tuple[int, float]:
    """(rows, CPU seconds) of decoding every file with default iter_batches."""
    c0, n = cpu_seconds(), 0
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(columns=columns):
            n += rb.num_rows
    return n, cpu_seconds() - c0


def pipeline_pass(plan, cfg, workers: int, batch_size: int) -> tuple[int, float, float]:
    """(rows, CPU seconds, wall seconds) of one epoch of ready batches on one rank."""
    loader = ParquetLoader(
        plan, cfg.data, cfg.features, rank=0, world_size=1, batch_size=batch_size, seed=0, shuffle=True,
        drop_last=True, num_workers=workers,
    )  # fmt: skip
    c0, t0, n = cpu_seconds(), time.perf_counter(), 0
    for b in loader:
        n += b.size
    return n, cpu_seconds() - c0, time.perf_counter() - t0


def throughput(data: Path, workers: list[int], repeats: int, batch_size: int, default_workers: int) -> dict:
    cfg = load_config(["--config", CONFIG])
    plan = plan_dataset(str(data), cfg.data, cfg.features)
    pyarrow_pass(plan.files, plan.columns)  # warm-up: page cache
    best_pa = max(r / c for r, c in (pyarrow_pass(plan.files, plan.columns) for _ in range(repeats)))
    out: dict = {"rows": plan.num_rows, "files": len(plan.files), "row_groups": len(plan.units)}
    out |= {"batch_size": batch_size, "pyarrow_rows_per_cpu_s": best_pa}
    for w in workers:
        runs = [pipeline_pass(plan, cfg, w, batch_size) for _ in range(repeats)]
        rows, cpu, wall = min(runs, key=lambda r: r[1])
        out[f"workers_{w}"] = {
            "rows_per_cpu_s": rows / cpu,
            "cpu_s": cpu,
            "wall_s": wall,
            "ratio_vs_pyarrow": rows / cpu / best_pa,
        }
    out["checksums"] = checksum_cost(plan, cfg, repeats, batch_size)
    head = out.get(f"workers_{default_workers}") or out[f"workers_{workers[0]}"]
    out["pipeline_rows_per_cpu_s"] = head["rows_per_cpu_s"]
    out["ratio_vs_pyarrow"] = head["ratio_vs_pyarrow"]
    out["pipeline_num_workers"] = default_workers if f"workers_{default_workers}" in out else workers[0]
    return out


def checksum_cost(plan, cfg, repeats: int, batch_size: int) -> dict:
    """Rows per CPU-second of the pipeline (0 workers) with page-checksum verification on and off, on files
    written with checksums; the passes alternate so both see the same machine load. Best of `repeats` each."""
    off = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, verify_checksums=False))
    on_runs, off_runs = [], []
    for _ in range(repeats):
        on_runs.append(pipeline_pass(plan, cfg, 0, batch_size))
        off_runs.append(pipeline_pass(plan, off, 0, batch_size))
    on = max(r / c for r, c, _ in on_runs)
    no = max(r / c for r, c, _ in off_runs)
    return {"verify_rows_per_cpu_s": on, "no_verify_rows_per_cpu_s": no, "cost_pct": 100 * (no / on - 1)}


_STREAM = """
import json, resource, sys, psutil
from config import load_config
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset
cfg = load_config(["--config", "configs/default.toml"])
plan = plan_dataset(sys.argv[1], cfg.data, cfg.features)
loader = ParquetLoader(plan, cfg.data, cfg.features, rank=0, world_size=1, batch_size=cfg.data.batch_size, seed=0,
                       shuffle=True, drop_last=True, num_workers=int(sys.argv[2]))
me = psutil.Process()
def pss():  # proportional set size: pages shared with forked readers are counted once
    return me.memory_full_info().pss + sum(c.memory_full_info().pss for c in me.children())
base = pss()
peak, rows = base, 0
for i, b in enumerate(loader):
    rows += b.size
    if i % 16 == 0:
        peak = max(peak, pss())
print(json.dumps({"base_mb": base / 2**20, "peak_growth_mb": (peak - base) / 2**20, "rows": rows}))
"""


def memory(budget_mb: int, work: Path) -> dict:
    """Stream a dataset of 10 x budget decoded bytes; peak RSS growth per reader count."""
    cfg = load_config(["--config", CONFIG])
    probe = work / "probe"
    generate(probe, 20_000, 1, 0, 0.0, 16384, "zstd")
    plan = plan_dataset(str(probe / "train"), cfg.data, cfg.features)
    per_row = pq.read_table(plan.files[0], columns=plan.columns).nbytes / plan.num_rows
    rows = int(10 * budget_mb * 2**20 / per_row) + 1
    generate(work / "big", rows, 32, 0, 0.0, 16384, "zstd")
    out = {"budget_mb": budget_mb, "decoded_bytes_per_row": per_row, "rows": rows, "decoded_mb": rows * per_row / 2**20}
    for w in (0, 1):
        res = subprocess.run(
            [sys.executable, "-c", _STREAM, str(work / "big" / "train"), str(w)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[f"workers_{w}"] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--rows", type=int, default=2_000_000, help="rows of synthetic data")
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--workers", default="0,1", help="reader counts to measure (comma-separated)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many passes per measurement")
    p.add_argument("--data", default="", help="existing dataset directory to use instead of generating one")
    p.add_argument("--memory", action="store_true", help="instead: peak RSS on a dataset 10x --budget-mb")
    p.add_argument("--budget-mb", type=int, default=192, help="memory budget for --memory")
    a = p.parse_args(argv)
    cfg = load_config(["--config", CONFIG])
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        if a.memory:
            res = memory(a.budget_mb, Path(tmp))
            print(json.dumps(res, indent=2))
        else:
            data = Path(a.data) if a.data else Path(tmp) / "train"
            if not a.data:
                t0 = time.perf_counter()
                generate(Path(tmp), a.rows, a.files, 0, 0.0, 16384, "zstd")
                print(f"generated {a.rows} rows in {time.perf_counter() - t0:.1f} s")
            workers = [int(w) for w in a.workers.split(",") if w]
            res = throughput(data, workers, a.repeats, cfg.data.batch_size, cfg.data.num_workers)
            print(f"{'reader':<22}{'rows/CPU-s':>14}{'vs pyarrow':>12}{'wall s':>9}")
            print(f"{'pyarrow iter_batches':<22}{res['pyarrow_rows_per_cpu_s']:>14,.0f}{1.0:>12.2f}{'':>9}")
            for w in workers:
                r = res[f"workers_{w}"]
                name = f"pipeline, {w} workers"
                print(f"{name:<22}{r['rows_per_cpu_s']:>14,.0f}{r['ratio_vs_pyarrow']:>12.2f}{r['wall_s']:>9.1f}")
            ck = res["checksums"]
            print(
                f"page checksums: {ck['verify_rows_per_cpu_s']:,.0f} rows/CPU-s verified vs "
                f"{ck['no_verify_rows_per_cpu_s']:,.0f} unverified ({ck['cost_pct']:+.1f}% CPU per row)"
            )
            head = f"headline (num_workers={res['pipeline_num_workers']})"
            print(f"{head}: ratio_vs_pyarrow = {res['ratio_vs_pyarrow']:.2f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
