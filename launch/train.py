"""Per-rank entry point: parse -> build -> train -> close.

python -m launch.train --config configs/tiny.toml --training.steps 20      # one process
torchrun --nproc_per_node 2 -m launch.train --config configs/tiny.toml     # or launch/train.sh
"""

from __future__ import annotations

import sys

from parallel.env import quiet_third_party, setup_env


def main(argv: list[str] | None = None) -> dict:
    """Run one training job; returns the summary (also written to <run>/summary.json)."""
    setup_env()  # before deepspeed is imported anywhere
    quiet_third_party()
    import os

    from config.job import ConfigError, load_config

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None

    from parallel.distributed import init_distributed
    from pipeline.errors import DataError
    from train.checkpoint import CheckpointError
    from train.trainer import Trainer, destroy

    info = init_distributed()
    try:
        try:
            trainer = Trainer(cfg, info)
            summary = trainer.fit()
        except (CheckpointError, DataError) as e:  # one line naming the file / key, no traceback
            raise SystemExit(f"error: {e}") from None
        if info.is_main:
            print_summary(summary)
        return summary
    finally:
        if info.owns_group:
            destroy()


def print_summary(summary: dict) -> None:
    """The final table of eval metrics and run figures."""
    rows = [("task", "auc", "uauc", "logloss")]
    for task, m in summary["eval"].items():
        rows.append((task, f"{m['auc']:.4f}", f"{m['uauc']:.4f}", f"{m['logloss']:.4f}"))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    print("\n== eval ==")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    print(
        f"steps {summary['steps']}  params {summary['params']:,}  samples/s {summary['samples_per_s']:.0f}  "
        f"MFU {summary['mfu']:.4f}  rows {summary['rows_consumed']:,}  wall {summary['wall_s']:.1f}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
