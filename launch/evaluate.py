"""Evaluate a run's checkpoint on any labelled dataset with the sparse-inference model; writes <run>/eval.json.

    python -m launch.evaluate --run runs/tiny [--checkpoint PATH] [--data.eval PATH] [--section.field value]
    torchrun --nproc_per_node 2 -m launch.evaluate --run-dir runs/tiny    # rows split over the ranks

(`--run-dir` is the same flag as `--run`: torchrun would take `--run` for an abbreviation of its `--run-path`.)
What is scored and how: serving/evaluate.py. By default every row is scored (training.eval_batches is
set to 0 unless given on the command line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from parallel.env import setup_env


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory (--run-dir under torchrun)")
    p.add_argument(
        "--checkpoint",
        default="",
        help="a checkpoint directory (default: checkpoints/best if the run kept one, else the latest complete one)",
    )
    p.add_argument("--out", default="", help="where to write the result (default <run>/eval.json)")
    args, rest = p.parse_known_args(argv)
    if not any(a.split("=")[0] == "--training.eval_batches" for a in rest):
        rest = [*rest, "--training.eval_batches", "0"]
    return args, rest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point; returns eval.json's content (written by rank 0)."""
    setup_env()
    # DeepSpeed (imported by the process-group start-up) reads DS_ACCELERATOR: these wait for setup_env().
    from checkpoint.format import CheckpointError
    from pipeline.errors import DataError
    from serving.evaluate import evaluate
    from serving.model import ServingError

    args, overrides = _parse(sys.argv[1:] if argv is None else argv)
    run = Path(args.run)
    try:
        result, is_main = evaluate(run, Path(args.checkpoint) if args.checkpoint else None, overrides)
    except (ServingError, CheckpointError, DataError) as e:
        raise SystemExit(f"evaluate: {e}") from None
    if is_main:
        out = Path(args.out) if args.out else run / "eval.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        for task, m in result["eval"].items():
            print(
                f"{task}: auc {m['auc']:.4f}  uauc {m['uauc']:.4f}  logloss {m['logloss']:.4f}  ne {m['ne']:.4f}  "
                f"rows {m['count']}"
            )
        print(f"evaluate: step {result['step']} of {result['checkpoint']} -> {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
