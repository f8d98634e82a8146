"""Fault injection: kill -9 a training rank at random moments of checkpoint writes, N times, and check
that the run still ends as if nothing had happened.

    python -m bench.faults [--kills 10] [--rows 40000] [--seed 0] [--json FILE]

On a synthetic log (`pipeline.tools.synth`, --rows rows, 4 files) it runs configs/tiny.toml for one
epoch through the real launcher (`launch/train.sh`: torchrun, 2 processes, `data.drop_last = false`,
a checkpoint every 4 steps) twice:
1. uninterrupted (the reference);
2. with faults: a watcher polls `checkpoints/` every millisecond; when a checkpoint starts being
   written (`step_N.tmp/` appears) it waits a random 0-40 ms and, if the write is still under way,
   kill -9s one of the two ranks at random (half the writes are let through, so the kills land
   at random checkpoints). torchrun's elastic restart (MAX_RESTARTS = kills + 2)
   brings the job back, which resumes from the newest complete, verified checkpoint. Repeated until
   --kills kills landed inside a write (or the epoch ended first).

Reported (JSON keys): kills (landed inside a write), restarts (the run's own count), resumes_ok (the
job finished with exit code 0), rows_lost_or_repeated (|rows consumed - rows in the dataset| plus a
checksum mismatch flag: both 0 / false when every row trained exactly once), duplicate_metric_steps
(train steps logged twice in metrics.jsonl), leftover_tmp (half-written checkpoint folders left in
place), auc_diff (max over tasks of |AUC faulted - AUC reference| on the eval split) and the wall
times. Exit code 1 when the job did not finish or a row was lost or repeated. `make bench` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_sh(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """launch/train.sh configs/tiny.toml ARGS, output to the file `log` (a pipe nobody reads while the
    watcher polls would fill up and block the ranks' prints)."""
    with log.open("w") as out:
        return subprocess.Popen(
            ["bash", str(REPO / "launch" / "train.sh"), str(REPO / "configs" / "tiny.toml"), *args],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def workers(agent_pid: int) -> list[int]:
    """PIDs of the training ranks under a torchrun agent (children running launch.train)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines()[1:]:
        pid, ppid, args = line.split(None, 2)
        children.setdefault(int(ppid), []).append((int(pid), args))
    found, todo = [], [agent_pid]
    while todo:
        for pid, args in children.get(todo.pop(), []):
            todo.append(pid)
            if "launch.train" in args and "torch.distributed.run" not in args:
                found.append(pid)
    return found


def inject(proc: subprocess.Popen, ckpt_root: Path, kills: int, rng: random.Random) -> list[dict]:
    """Kill a random rank inside `kills` checkpoint writes of the running job; returns one record per kill."""
    done: list[dict] = []
    seen: set[str] = set()
    while len(done) < kills and proc.poll() is None:
        writing = [p for p in ckpt_root.glob("step_*.tmp")] if ckpt_root.is_dir() else []
        fresh = [p for p in writing if p.name not in seen]
        if not fresh:
            time.sleep(0.001)
            continue
        tmp = fresh[0]
        seen.add(tmp.name)  # one shot per write (a resumed run rewrites the same step under a new attempt)
        if rng.random() < 0.5:
            continue  # half the writes are let through: kills land at random checkpoints, not only the first
        time.sleep(rng.uniform(0.0, 0.04))
        ranks = workers(proc.pid)
        if not tmp.exists() or len(ranks) != 2:
            continue  # the write finished first (or a restart is under way): wait for the next one
        victim = rng.choice(ranks)
        os.kill(victim, signal.SIGKILL)
        done.append({"checkpoint": tmp.name.removesuffix(".tmp"), "pid": victim, "t": time.time()})
        while proc.poll() is None and set(workers(proc.pid)) & set(ranks):
            time.sleep(0.01)  # the agent tears the survivors down before it restarts the job
        seen.clear()  # the restarted job writes these steps again: new writes, new chances
    return done


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=10, help="kill -9s to land inside checkpoint writes")
    p.add_argument("--rows", type=int, default=40_000, help="rows of synthetic data (one epoch is trained)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill timing and victim choice")
    p.add_argument("--json", default="", help="write the results here")
    a = p.parse_args(argv)
    from pipeline.tools.synth import main as synth

    with tempfile.TemporaryDirectory(prefix="bench_faults_") as tmp:
        data = Path(tmp) / "data"
        synth(["--out", str(data), "--rows", str(a.rows), "--files", "4", "--seed", "3", "--row-group-size", "3000"])
        common = ["--data.train", f"{data}/train", "--data.eval", f"{data}/eval", "--training.steps", "0",
                  "--training.epochs", "1", "--training.checkpoint_every", "4", "--training.log_every", "10",
                  "--data.drop_last", "false"]  # fmt: skip
        env = {"OMP_NUM_THREADS": "1"}
        runs: dict[str, dict] = {}
        t0 = time.perf_counter()
        ref_log = Path(tmp) / "reference.log"
        ref = train_sh([*common, "--training.output_dir", f"{tmp}/reference"], {**env, "MAX_RESTARTS": "0"}, ref_log)
        if ref.wait() != 0:
            raise RuntimeError(f"bench.faults: the reference run failed:\n{ref_log.read_text()[-3000:]}")
        runs["reference"] = json.loads(Path(f"{tmp}/reference/summary.json").read_text())
        ref_wall = time.perf_counter() - t0

        t0 = time.perf_counter()
        run = Path(tmp) / "faulted"
        log = Path(tmp) / "faulted.log"
        proc = train_sh([*common, "--training.output_dir", str(run)], {**env, "MAX_RESTARTS": str(a.kills + 2)}, log)
        kills = inject(proc, run / "checkpoints", a.kills, random.Random(a.seed))
        proc.wait()
        out = log.read_text()
        faulted_wall = time.perf_counter() - t0
        ok = proc.returncode == 0
        result: dict = {"kills": len(kills), "kills_requested": a.kills, "resumes_ok": ok, "rows": a.rows}
        result |= {"reference_wall_s": ref_wall, "faulted_wall_s": faulted_wall, "killed_in": kills}
        if not ok:
            result["tail"] = out[-3000:]
        else:
            s = json.loads((run / "summary.json").read_text())
            audit, r = s["audit"], runs["reference"]
            logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
            result |= {
                "restarts": s["restarts"],
                "resumed_from": s["resumed_from"],
                "rows_lost_or_repeated": abs(s["rows_consumed"] - audit["dataset"]["count"]),
                "checksum_mismatch": not audit["exactly_once"],
                "duplicate_metric_steps": len(logged) - len(set(logged)),
                "leftover_tmp": sorted(p.name for p in (run / "checkpoints").glob("*.tmp")),
                "auc": {t: [r["eval"][t]["auc"], s["eval"][t]["auc"]] for t in s["eval"]},
                "auc_diff": max(abs(s["eval"][t]["auc"] - r["eval"][t]["auc"]) for t in s["eval"]),
                "logloss_diff": max(abs(s["eval"][t]["logloss"] - r["eval"][t]["logloss"]) for t in s["eval"]),
            }
    print(
        f"kills inside checkpoint writes: {result['kills']}/{a.kills}; finished: {ok}; "
        + (
            f"restarts {result['restarts']}; rows lost or repeated {result['rows_lost_or_repeated']} "
            f"(checksum mismatch: {result['checksum_mismatch']}); duplicate metric steps "
            f"{result['duplicate_metric_steps']}; half-written checkpoints left {len(result['leftover_tmp'])}; "
            f"max |AUC diff| vs uninterrupted {result['auc_diff']:.2e}"
            if ok
            else "the faulted run FAILED:\n" + result["tail"]
        ),
        flush=True,
    )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def passed(result: dict) -> bool:
    """The run finished and trained every row exactly once (what the exit code of the command reports)."""
    return bool(result["resumes_ok"]) and not result["rows_lost_or_repeated"] and not result["checksum_mismatch"]


if __name__ == "__main__":
    sys.exit(0 if passed(main()) else 1)
