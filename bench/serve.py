"""Serving benchmark: latency and throughput of the exported tiny model, fp32 vs int8 tables.

    python -m bench.serve [--json FILE] [--workdir DIR] [--fresh] [--seconds S] [--threads N]

Self-contained: the first run writes tiny synthetic data, trains configs/tiny.toml for a few steps in
this process, and exports two artifacts (fp32 tables, int8 tables) under --workdir (default
.build/bench_serve); later runs reuse them (--fresh rebuilds). Each artifact is then loaded the way
`launch.predict` loads it and timed at batch sizes 1, 64 and 512 on real rows of the eval split:

- "fp32" / "int8": the whole InferenceModel, KJT + dense features -> probabilities (embedding lookup,
  sparse-inference MoE that skips zero-gate experts);
- "program": the torch.export program of the dense path (pooled embeddings precomputed), which runs
  every expert densely weighted (the sparse dispatch does not export).

Per call: p50 and p99 latency (ms) over the calls made in --seconds per cell after a warm-up, and
throughput = rows per second at the mean latency, single stream, on --threads intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.toml")
BATCH_SIZES = (1, 64, 512)


def build_artifacts(workdir: Path, fresh: bool) -> dict[str, Path]:
    """Data, a short tiny training run and both artifacts under `workdir` (reused unless `fresh`)."""
    arts = {"fp32": workdir / "artifact", "int8": workdir / "artifact_int8"}
    if not fresh and all((a / "manifest.json").is_file() for a in arts.values()):
        return arts
    from launch.train import main as train_main
    from pipeline.tools.synth import main as synth_main
    from serving.export import export

    data, run = workdir / "data", workdir / "run"
    synth_main(["--out", str(data), "--rows", "4000", "--files", "2", "--seed", "3"])
    train_main(
        ["--config", CONFIG, "--data.train", f"{data}/train", "--data.eval", f"{data}/eval"]
        + ["--training.output_dir", str(run), "--training.steps", "12", "--training.resume", "never"]
        + ["--training.checkpoint_every", "0", "--training.eval_batches", "1", "--metrics.plots", "false"]
    )
    export(run, arts["fp32"])
    export(run, arts["int8"], quantize="int8")
    return arts


def time_calls(fn: Any, seconds: float, warmup: int = 3) -> list[float]:
    """Wall seconds of each call of `fn()` made within `seconds` (at least 20 calls) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 20:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench(arts: dict[str, Path], seconds: float) -> list[dict[str, Any]]:
    """One row per (variant, batch size): p50/p99 ms and rows/s."""
    from pipeline.loader import ParquetLoader
    from pipeline.plan import plan_dataset
    from serving.model import load_artifact, load_program

    rows: list[dict[str, Any]] = []
    models = {name: load_artifact(path)[0] for name, path in arts.items()}
    program = load_program(arts["fp32"]).module()
    cfg = models["fp32"].cfg
    plan = plan_dataset(cfg.data.eval, cfg.data, cfg.features)
    for bs in BATCH_SIZES:
        loader = ParquetLoader(
            plan,
            cfg.data,
            cfg.features,
            rank=0,
            world_size=1,
            batch_size=bs,
            seed=0,
            shuffle=False,
            drop_last=True,
            num_workers=0,
        )
        batch = next(iter(loader))
        sparse_BI = models["fp32"].embed(batch.sparse)
        sp, dn = batch.sparse, batch.dense
        calls = {
            "fp32": lambda m=models["fp32"], sp=sp, dn=dn: m(sp, dn),
            "int8": lambda m=models["int8"], sp=sp, dn=dn: m(sp, dn),
            "program": lambda x=sparse_BI, dn=dn: program(x, dn),
        }
        for name, fn in calls.items():
            with torch.no_grad():
                t = np.array(time_calls(fn, seconds)) * 1e3
            rows.append(
                {
                    "variant": name,
                    "batch": bs,
                    "p50_ms": float(np.percentile(t, 50)),
                    "p99_ms": float(np.percentile(t, 99)),
                    "rows_per_s": float(bs / (t.mean() / 1e3)),
                    "calls": int(t.size),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--workdir", default=".build/bench_serve", help="data, run and artifacts (reused)")
    p.add_argument("--fresh", action="store_true", help="rebuild data, run and artifacts")
    p.add_argument("--seconds", type=float, default=1.5, help="timed seconds per (variant, batch) cell")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (one serving stream; 0 = torch default)")
    args = p.parse_args(argv)
    from parallel.env import setup_env

    setup_env()
    t0 = time.perf_counter()
    arts = build_artifacts(Path(args.workdir), args.fresh)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench(arts, args.seconds)
    manifests = {k: json.loads((v / "manifest.json").read_text()) for k, v in arts.items()}
    result = {
        "rows": rows,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "tables_bytes": {k: m["sizes"]["tables_bytes"] for k, m in manifests.items()},
        "auc_change_int8": manifests["int8"].get("eval", {}).get("auc_change_int8"),
        "wall_s": time.perf_counter() - t0,
    }
    print(f"\nserving, tiny RankMixer (MoE, sparse inference), {result['threads']} threads, CPU")
    print(f"{'variant':<9} {'batch':>5} {'p50 ms':>9} {'p99 ms':>9} {'rows/s':>11}")
    for r in rows:
        print(f"{r['variant']:<9} {r['batch']:>5} {r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f} {r['rows_per_s']:>11,.0f}")
    print(f"tables: fp32 {result['tables_bytes']['fp32']:,} B, int8 {result['tables_bytes']['int8']:,} B")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
