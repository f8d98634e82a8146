"""Planning at scale: time and memory of `pipeline.plan.plan_dataset` (footers only) against the number of
files, and the per-rank split of the plan.

    python -m bench.plan [--json FILE] [--files 1000,10000,100000] [--threads 1,16]

Writes one small Parquet file of the synthetic schema (100 rows in 4 row groups of 25) and copies it to
N files in a temporary folder (the benchmark measures planning, so the files are tiny), then per N and
thread count: wall seconds of `plan_dataset`, the Python heap it allocated (tracemalloc peak, in a
second untimed plan) and what the plan holds per file, and the time to
split the plan over 64 ranks (`pipeline.split`). The last line fits time = a + b x files by least
squares over the sizes (the scaling law).

Local disk here; on a remote filesystem every footer is a round trip, which is what the threads hide.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench import write_json
from config import load_config
from pipeline.plan import plan_dataset
from pipeline.split import batches_per_rank, epoch_order, rank_rows, slice_units
from pipeline.tools.synth import generate

REPO = Path(__file__).resolve().parent.parent


def link_copies(root: Path, n: int, template: Path) -> Path:
    """`n` copies of `template` in root/n<N> (hard links where the filesystem allows: no data written)."""
    out = root / f"n{n}"
    out.mkdir()
    for i in range(n):
        dst = out / f"part-{i:06d}.parquet"
        try:
            os.link(template, dst)
        except OSError:
            shutil.copy(template, dst)
    return out


def split(plan: Any, rank: int, ranks: int, batch: int = 64) -> list[Any]:
    """This rank's work units of one shuffled epoch, as the loader computes them."""
    order = epoch_order(plan, seed=0, epoch=0, shuffle=True)
    batches = batches_per_rank(plan.num_rows, ranks, batch, drop_last=True)
    first, count = rank_rows(plan.num_rows, ranks, rank, batches, batch, drop_last=True)
    return slice_units(order, first, count)


def measure(
    folder: Path, threads: int, data: Any, features: Any, ranks: int = 64, memory: bool = True
) -> dict[str, float]:
    """One plan of `folder` with `threads` footer threads: seconds, heap peak (with `memory`), plan size,
    split time."""
    d = dataclasses.replace(data, plan_threads=threads)
    t0 = time.perf_counter()
    plan = plan_dataset(str(folder), d, features)
    seconds = time.perf_counter() - t0
    peak = 0
    if memory:  # a second plan under tracemalloc (it slows every allocation: not timed)
        del plan
        tracemalloc.start()
        plan = plan_dataset(str(folder), d, features)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    t1 = time.perf_counter()
    for rank in (0, ranks - 1):
        split(plan, rank, ranks)
    split_s = (time.perf_counter() - t1) / 2
    files = len(plan.files)
    pickled = len(pickle.dumps(plan.units)) + len(pickle.dumps(plan.files))
    return {
        "files": float(files),
        "units": float(len(plan.units)),
        "threads": float(threads),  # 0 = auto
        "seconds": seconds,
        "files_per_s": files / seconds,
        "heap_peak_mb": peak / 2**20,
        "heap_bytes_per_file": peak / files,
        "plan_pickled_bytes_per_file": pickled / files,
        "split_64_ranks_s": split_s,
    }


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares a + b x over (x, y) points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - b * mx, b


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every size and thread count, print the table, optionally write JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.plan", description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--files", default="1000,10000,100000", help="file counts (comma-separated)")
    p.add_argument("--threads", default="1,0", help="footer threads to compare (0 = data.plan_threads' auto)")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.files.split(",") if x]
    thread_counts = [int(x) for x in args.threads.split(",") if x]
    cfg = load_config(["--config", str(REPO / "configs" / "tiny.toml")])
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root / "src", 100, 1, 0, 0.0, 25, "zstd")
        template = next((root / "src" / "train").glob("*.parquet"))
        for n in sizes:
            folder = link_copies(root, n, template)
            for threads in thread_counts:
                rows.append(measure(folder, threads, cfg.data, cfg.features, memory=True))
                r = rows[-1]
                print(
                    f"{n:>8,d} files  {threads:>2d} threads  {r['seconds']:7.2f} s  "
                    f"({r['files_per_s']:8,.0f} files/s)  "
                    f"heap peak {r['heap_peak_mb']:7.1f} MB ({r['heap_bytes_per_file']:5.0f} B/file)  "
                    f"plan {r['plan_pickled_bytes_per_file']:4.0f} B/file pickled  "
                    f"split/64 ranks {r['split_64_ranks_s']:.3f} s",
                    flush=True,
                )
            shutil.rmtree(folder)
    laws = {}
    for threads in thread_counts:
        pts = [(r["files"], r["seconds"]) for r in rows if r["threads"] == threads]
        if len(pts) >= 2:
            a, b = fit(pts)
            laws[str(threads)] = {"a_s": a, "b_s_per_file": b}
            print(f"scaling, {threads} threads: seconds = {a:.3f} + {b * 1e6:.1f} us x files")
    res = {"rows": rows, "scaling": laws}
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
