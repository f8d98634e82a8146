"""Training throughput and a step-time breakdown on the default config, 1 and 2 processes.

    python -m bench.train [--json FILE] [--rows N] [--steps N]

Generates its own data (default schema of pipeline.tools.synth), runs `launch/train.sh`-equivalent torchrun
jobs of this module's worker on 1 and 2 processes (same threads in total), and times each phase of
a training step with wall clocks between synchronisation points:

    data       next batch from the loader (+ host-to-device copy)
    sparse     TorchRec lookup + the pooled all-to-all (DMP forward) + regroup
    dense_fwd  the DeepSpeed engine's forward (of which expert_a2a: the expert all-to-alls) + loss
    backward   engine.backward: dense + expert all-to-all backward + embedding backward with the
               fused sparse optimizer + DeepSpeed's gradient all-reduce
    optimizer  global-norm clip + engine.step + L1 controller

The breakdown runs the plain loop (`training.pipeline = false`: phases are timed one after the other).
Then the trainer's own step loop on 2 processes, pipelined (batch i+1 copied and its embedding input
all-to-all started during step i, `train/pipeline.py`) against plain, alternated run by run: samples/s
of each and whether their losses are identical step by step.

Also times the JIT build of DeepSpeed's CPU comm op into an empty extensions folder (what a run
would pay without `make install`'s pre-build). Figures of one run, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PHASES = ("data", "sparse", "dense_fwd", "backward", "optimizer")


def worker(args: argparse.Namespace) -> None:
    """One rank: build the real Trainer from configs/default.toml, time `steps` steps after warmup."""
    from parallel.env import setup_env

    setup_env()
    import torch

    from config import load_config
    from parallel import expert_parallel
    from parallel.distributed import all_reduce_sum, destroy, init_distributed
    from train.trainer import Trainer

    a2a_time = [0.0]
    original_a2a = expert_parallel.all_to_all

    def timed_a2a(x, group):
        t0 = time.perf_counter()
        y = original_a2a(x, group)
        a2a_time[0] += time.perf_counter() - t0
        return y

    expert_parallel.all_to_all = timed_a2a
    info = init_distributed()
    overrides = [
        "--config", str(REPO / "configs" / "default.toml"),
        "--data.train", f"{args.data}/train", "--data.eval", "",
        "--training.output_dir", args.out, "--metrics.wandb", "false", "--training.resume", "never",
        *args.overrides,
    ]  # fmt: skip
    if not args.loop:
        overrides += ["--training.pipeline", "false"]  # phases one after the other
    cfg = load_config(overrides, world_size=info.world_size)
    tr = Trainer(cfg, info)
    if args.loop:
        _time_loop(tr, args, info)
        if info.owns_group:
            destroy()
        return
    times = dict.fromkeys(PHASES, 0.0)
    a2a_measured = 0.0
    it = iter(tr.loader)
    step = tr.step_fn
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            times = dict.fromkeys(PHASES, 0.0)
            a2a_time[0] = 0.0
        t0 = time.perf_counter()
        batch = next(it).to(tr.device)
        t1 = time.perf_counter()
        step.set_lr(i)
        sparse_BI = step.embed(batch)
        t2 = time.perf_counter()
        out = step.dense(sparse_BI, batch.dense)
        loss = step.loss(out, batch, sparse_BI)[0]
        t3 = time.perf_counter()
        tr.engine.backward(loss)
        t4 = time.perf_counter()
        step.update()
        if tr.device.type == "cuda":
            torch.cuda.synchronize()
        t5 = time.perf_counter()
        for k, (s, e) in zip(PHASES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))):
            times[k] += e - s
    a2a_measured = a2a_time[0]
    total = sum(times.values())
    sums = all_reduce_sum([times[k] for k in PHASES] + [a2a_measured, total], tr.device)
    world = info.world_size
    if info.is_main:
        per_step = {k: v / world / args.steps for k, v in zip(PHASES, sums[: len(PHASES)])}
        step_s = sums[-1] / world / args.steps
        result = {
            "world_size": world,
            "batch_per_rank": cfg.data.batch_size,
            "step_s": step_s,
            "samples_per_s": world * cfg.data.batch_size / step_s,
            "breakdown_s": per_step,
            "expert_a2a_fwd_s": sums[len(PHASES)] / world / args.steps,
            "params": tr.params,
            "threads_per_rank": torch.get_num_threads(),
        }
        Path(args.result).write_text(json.dumps(result))
    if info.owns_group:
        destroy()


def _time_loop(tr: Any, args: argparse.Namespace, info: Any) -> None:
    """The trainer's step loop as `Trainer._train` runs it (lookup handed over, next batch started after
    the embedding), `steps` timed after `warmup`; writes samples/s and every step's loss."""
    import torch

    from parallel.distributed import all_reduce_sum

    losses, t0 = [], 0.0
    total = args.warmup + args.steps
    for i, batch in enumerate(tr.loader):
        if i == args.warmup:
            t0 = time.perf_counter()
        ahead = tr.loader.prefetch_next if i + 1 < total else None
        row, _ = tr.step_fn(batch, i, lookup=tr.loader.take_lookup(), after_embed=ahead)
        losses.append(float(row["loss"]))
        if i + 1 == total:
            break
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    dt = all_reduce_sum([time.perf_counter() - t0], tr.device)[0] / info.world_size
    if info.is_main:
        samples = args.steps * tr.cfg.data.batch_size * info.world_size
        Path(args.result).write_text(
            json.dumps({"step_s": dt / args.steps, "samples_per_s": samples / dt, "losses": losses})
        )


def run(world: int, data: str, steps: int, warmup: int, overrides: list[str], loop: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world)), "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
        cmd += ["-m", "bench.train", "--worker", "--data", data, "--out", f"{tmp}/run", "--result", str(result)]
        cmd += ["--steps", str(steps), "--warmup", str(warmup), *(["--loop"] if loop else []), "--", *overrides]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench.train worker (world {world}) failed:\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n")[0])
    p.add_argument("--json", default="", help="write the figures here")
    p.add_argument("--rows", type=int, default=150_000, help="rows of generated data")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="pipelined / plain loop runs, alternated")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="--section.field value overrides after --")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    from pipeline.tools.synth import main as synth

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        synth(["--out", tmp, "--rows", str(args.rows), "--files", "4", "--seed", "0"])
        for name, world, extra in (
            ("dense_1proc", 1, []),
            ("dense_2proc", 2, []),
            ("moe_ep2_2proc", 2, ["--moe.enabled", "true", "--parallelism.ep_size", "2"]),
        ):
            results[name] = run(world, tmp, args.steps, args.warmup, [*args.overrides, *extra])
        loops: dict[str, list[dict]] = {"pipelined": [], "plain": []}
        for _ in range(args.rounds):  # alternated: both sides see the same machine load
            for name, flag in (("pipelined", "true"), ("plain", "false")):
                over = [*args.overrides, "--training.pipeline", flag]
                loops[name].append(run(2, tmp, args.steps, args.warmup, over, loop=True))
    best = {k: max(v, key=lambda r: r["samples_per_s"]) for k, v in loops.items()}
    results["loop_2proc"] = {
        "pipelined_samples_per_s": best["pipelined"]["samples_per_s"],
        "plain_samples_per_s": best["plain"]["samples_per_s"],
        "pipelined_vs_plain": best["pipelined"]["samples_per_s"] / best["plain"]["samples_per_s"],
        "losses_identical": all(r["losses"] == loops["plain"][0]["losses"] for v in loops.values() for r in v),
        "rounds": args.rounds,
    }
    results["scaling_2proc_vs_1proc"] = (
        results["dense_2proc"]["samples_per_s"] / results["dense_1proc"]["samples_per_s"]
    )
    print(f"{'run':16s} {'samples/s':>10s} {'step ms':>8s} " + " ".join(f"{k:>10s}" for k in PHASES) + "  expert_a2a")
    for name in ("dense_1proc", "dense_2proc", "moe_ep2_2proc"):
        r = results[name]
        cells = " ".join(f"{1000 * r['breakdown_s'][k]:10.1f}" for k in PHASES)
        a2a = 1000 * r["expert_a2a_fwd_s"]
        print(f"{name:16s} {r['samples_per_s']:10.0f} {1000 * r['step_s']:8.1f} {cells}  {a2a:9.1f}")
    lp = results["loop_2proc"]
    print(
        f"trainer loop, 2 processes, best of {lp['rounds']}: pipelined {lp['pipelined_samples_per_s']:.0f} vs plain "
        f"{lp['plain_samples_per_s']:.0f} samples/s (x{lp['pipelined_vs_plain']:.2f}); "
        f"losses identical: {lp['losses_identical']}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
