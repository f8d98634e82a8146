"""Part (b) of `bench.gpu_check`: the whole trainer on the device, then serving, then CUDA against CPU.

1. `launch.train` under torchrun (1 process: NCCL on a GPU, gloo on CPU) for `steps` steps on freshly
   synthesised data: TorchRec tables from the planner (fbgemm fused kernels), the per-token MoE through
   the DeepSpeed engine (ep 1), bf16 on a GPU, the pipelined loop, W&B offline. Its samples/s and MFU
   (embeddings included: the summary's analytic FLOPs over the whole train step) and the planner's
   kernels.
2. `launch.evaluate`, `launch.export` and `launch.predict` of that run, on the same device.
3. A short fp32 run on the device against the same run on the CPU (same data, seed and steps;
   `CUDA_VISIBLE_DEVICES=""` for the CPU one): the largest per-step loss difference and the eval AUC
   differences, checked against LOSS_TOL / AUC_TOL.

Needs torchrec, fbgemm-gpu and deepspeed (the offline wheelhouse brings them to a bare GPU host).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
LOSS_TOL = 2e-3
"""Largest per-step |loss(device) - loss(cpu)| accepted in fp32: different kernels (cuBLAS, fbgemm's CUDA
lookups, NCCL) round differently, and 20 steps of Adam/Adagrad let the differences grow a little."""
AUC_TOL = 5e-3
"""Largest |eval AUC(device) - eval AUC(cpu)| accepted per task."""


def _env(cpu_only: bool = False) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(cmd: list[str], env: dict[str, str], what: str) -> tuple[str, float]:
    """Run `python -m ...`; (output, wall seconds); raises with the output's tail when it fails."""
    with tempfile.TemporaryFile(mode="w+") as log:  # a file, not a pipe: nobody reads while it runs
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
        log.seek(0)
        text = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}:\n{text[-3000:]}")
    return text, wall


def _train(data: Path, run: Path, config: Path, steps: int, extra: list[str], env: dict[str, str]) -> float:
    cmd = [
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "launch.train",
        "--config", str(config), "--data.train", str(data / "train"), "--data.eval", str(data / "eval"),
        "--training.output_dir", str(run), "--training.steps", str(steps), "--training.eval_every", "0", *extra,
    ]  # fmt: skip
    return _run(cmd, env, f"launch.train ({run.name})")[1]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def trainer_suite(device: torch.device, steps: int, config: Path, rows: int, compare_steps: int) -> dict[str, Any]:
    """The three stages above; every figure in one dict."""
    bf16 = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="gpu_trainer_") as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        synth = ["-m", "pipeline.tools.synth", "--out", str(data), "--rows", str(rows), "--files", "2", "--seed", "0"]
        _run(synth, _env(), "pipeline.tools.synth")
        main = ["--training.dtype", "bf16" if bf16 else "fp32", "--moe.enabled", "true", "--metrics.wandb", "true"]
        if not bf16:  # an fp32 run already: it doubles as the device side of stage 3
            main += ["--training.log_every", "1"]
        wall = _train(data, run, config, steps, main, _env())
        s = json.loads((run / "summary.json").read_text())
        kernels = sorted({t["compute_kernel"] for t in s["sharding"]["tables"].values()})
        wandb_files = [p.name for p in run.rglob("*.wandb")]
        # 2. serving of that run on the same device
        _, t_eval = _run(["-m", "launch.evaluate", "--run", str(run)], _env(), "launch.evaluate")
        evaluated = json.loads((run / "eval.json").read_text())["eval"]
        art = Path(tmp) / "artifact"
        export = ["-m", "launch.export", "--run", str(run), "--out", str(art), "--eval-data", ""]  # evaluate scored it
        _, t_export = _run(export, _env(), "launch.export")
        preds = Path(tmp) / "preds.parquet"
        predict = ["-m", "launch.predict", "--artifact", str(art), "--data", str(data / "eval"), "--out", str(preds)]
        _, t_predict = _run([*predict, "--dtype", "bf16" if bf16 else "fp32"], _env(), "launch.predict")
        # 3. fp32 on the device against fp32 on the CPU (on a CPU host the run above is the device side)
        same = ["--training.dtype", "fp32", "--moe.enabled", "true", "--training.log_every", "1"]
        dev_run, cpu_run = (Path(tmp) / "fp32_device", Path(tmp) / "fp32_cpu") if bf16 else (run, Path(tmp) / "cpu")
        compare_steps = compare_steps if bf16 else steps
        if bf16:
            _train(data, dev_run, config, compare_steps, same, _env())
        _train(data, cpu_run, config, compare_steps, same, _env(cpu_only=True))
        dev_l, cpu_l = _losses(dev_run), _losses(cpu_run)
        if dev_l.keys() != cpu_l.keys() or not dev_l:
            raise RuntimeError(f"fp32 runs logged different steps: {sorted(dev_l)} vs {sorted(cpu_l)}")
        loss_diff = max(abs(dev_l[k] - cpu_l[k]) for k in dev_l)
        dev_eval = json.loads((dev_run / "summary.json").read_text())["eval"]
        cpu_eval = json.loads((cpu_run / "summary.json").read_text())["eval"]
        auc_diff = {k: abs(dev_eval[k]["auc"] - cpu_eval[k]["auc"]) for k in dev_eval}
    return {
        "config": str(config.relative_to(REPO)),
        "dtype": "bf16" if bf16 else "fp32",
        "steps": s["steps"],
        "samples_per_s": s["samples_per_s"],
        "mfu": s["mfu"],
        "flops_per_sample": s["flops_per_sample"],
        "peak_flops_source": s["peak_flops_source"],
        "params": s["params"],
        "input_pipeline": s["input_pipeline"],
        "table_kernels": kernels,
        "wandb_offline_files": len(wandb_files),
        "eval": s["eval"],
        "launch_wall_s": wall,
        "evaluate": {
            "wall_s": t_eval,
            "auc": {k: v["auc"] for k, v in evaluated.items()},
            "auc_bound": {k: v.get("auc_bound", 0.0) for k, v in evaluated.items()},
        },
        "export_wall_s": t_export,
        "predict_wall_s": t_predict,
        "fp32_vs_cpu": {
            "steps": compare_steps,
            "max_loss_diff": loss_diff,
            "auc_diff": auc_diff,
            "loss_tol": LOSS_TOL,
            "auc_tol": AUC_TOL,
            "agree": loss_diff <= LOSS_TOL and max(auc_diff.values()) <= AUC_TOL,
        },
    }
