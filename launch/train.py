"""Per-rank entry point: parse -> build -> train -> close.

python -m launch.train --config configs/tiny.toml --training.steps 20      # one process
torchrun --nproc_per_node 2 -m launch.train --config configs/tiny.toml     # or launch/train.sh
deepspeed --num_gpus 2 --module launch.train --config configs/tiny.toml    # the DeepSpeed launcher
python -m launch.train --help                                              # every config field
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from config import ConfigError, JobConfig, load_config
from parallel.env import quiet_third_party, setup_env


def main(argv: list[str] | None = None) -> dict:
    """Run one training job; returns the summary (also written to <run>/summary.json)."""
    argv = sys.argv[1:] if argv is None else argv
    try:  # torch-free: --help and config errors answer at once
        cfg = load_config(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    sweep_trial_dir(cfg)
    setup_env()
    quiet_third_party()
    # DeepSpeed reads DS_ACCELERATOR when it is imported: these imports wait for setup_env().
    from parallel.distributed import destroy, init_distributed
    from pipeline.errors import DataError
    from train.checkpoint import CheckpointError
    from train.rundir import PREEMPTED_EXIT, Preempted, RunLockError, acquire_run_lock
    from train.trainer import Trainer

    info = init_distributed()
    lock = None
    try:
        try:
            lock = acquire_run_lock(cfg.output_dir, info.is_main)
            trainer = Trainer(cfg, info)
            summary = trainer.fit()
        except (CheckpointError, DataError, RunLockError) as e:  # one line naming the file / key, no traceback
            raise SystemExit(f"error: {e}") from None
        except Preempted:
            raise SystemExit(PREEMPTED_EXIT) from None  # the checkpoint is written; the same command resumes
        if info.is_main:
            print_summary(summary)
        return summary
    finally:
        if lock is not None:
            lock.release()
        if info.owns_group:
            destroy()


def sweep_trial_dir(cfg: JobConfig, environ: Mapping[str, str] = os.environ) -> None:
    """Under `wandb agent` (WANDB_SWEEP_ID and the trial's WANDB_RUN_ID set by the agent), every trial trains
    in its own run directory, `<output_dir>/<run id>`: one shared directory would make each trial resume
    the previous one. Outside a sweep nothing changes."""
    run_id = environ.get("WANDB_RUN_ID", "")
    if environ.get("WANDB_SWEEP_ID") and run_id:
        cfg.training.output_dir = str(cfg.output_dir / run_id)


def print_summary(summary: dict) -> None:
    """The final table of eval metrics and run figures (MFU as a percentage, like the per-step lines)."""
    rows = [("task", "auc", "uauc", "logloss")]
    for task, m in summary["eval"].items():
        rows.append((task, f"{m['auc']:.4f}", f"{m['uauc']:.4f}", f"{m['logloss']:.4f}"))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    print("\n== eval ==")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    print(
        f"steps {summary['steps']}  params {summary['params']:,}  samples/s {summary['samples_per_s']:.0f}  "
        f"MFU {100 * summary['mfu']:.2f}%  rows {summary['rows_consumed']:,}  wall {summary['wall_s']:.1f}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
