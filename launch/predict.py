"""Score a Parquet dataset with an exported artifact, in a fresh process.

    python -m launch.predict --artifact artifacts/tiny --data data/tiny/eval --out preds.parquet

Output columns and metrics: serving/predict.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from parallel.env import detect_runtime, setup_env


def main(argv: list[str] | None = None) -> dict:
    """Score `--data` with `--artifact`; returns {"rows", "out", "metrics"}."""
    p = argparse.ArgumentParser(prog="python -m launch.predict", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True, help="artifact directory written by launch.export")
    p.add_argument("--data", required=True, help="Parquet directory, glob, file or URI to score")
    p.add_argument("--out", default="predictions.parquet", help="predictions file (Parquet)")
    p.add_argument("--batch-size", type=int, default=0, help="rows per batch (default: data.eval_batch_size)")
    p.add_argument("--num-workers", type=int, default=0, help="reader processes")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dense compute dtype (bf16: GPU)")
    args = p.parse_args(argv)
    setup_env()
    # after parsing (--help answers at once) and setup_env (TORCH_EXTENSIONS_DIR, DS_ACCELERATOR): torch loads here
    from checkpoint.format import CheckpointError
    from pipeline.errors import DataError
    from serving.model import ServingError, load_artifact
    from serving.predict import predict_dataset, prediction_metrics, print_metrics, write_predictions

    device = detect_runtime().device
    try:
        model, _ = load_artifact(Path(args.artifact), dtype=args.dtype, device=device)
        cols = predict_dataset(
            model, args.data, batch_size=args.batch_size, num_workers=args.num_workers, device=device
        )
    except (ServingError, CheckpointError, DataError) as e:
        raise SystemExit(f"predict: {e}") from None
    out = Path(args.out)
    write_predictions(cols, out)
    metrics = prediction_metrics(cols, model.tasks)
    print(f"predict: {len(cols['row_id'])} rows -> {out}")
    print_metrics(metrics)
    return {"rows": int(len(cols["row_id"])), "out": str(out), "metrics": metrics}


if __name__ == "__main__":
    main()
