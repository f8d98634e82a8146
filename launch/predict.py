"""Score a Parquet dataset with an exported artifact, in a fresh process.

    python -m launch.predict --artifact artifacts/tiny --data data/tiny/eval --out preds.parquet

Reads the data with the pipeline's ParquetLoader (file order, one process, no row dropped; the
zero-weight padding rows of the last batch are skipped), scores every row with the artifact's
InferenceModel (sparse-inference router) and writes one Parquet row per input row:

    row_id, user_id, p_<task> for every task, and <label> for every label column the data has

When labels are present it prints AUC / UAUC / logloss / NE per task. Unlabeled data works: the
label, user-id and row-id columns the data lacks are left out (row_id -1, user_id 0).

Legend: B batch, K tasks.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from launch.env import detect_runtime
from launch.metrics.auc import EvalAccumulator
from launch.serving import InferenceModel, ServingError, iter_scores, load_artifact
from pipeline.errors import DataError
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset, resolve_files


def _columns_of(uri: str) -> set[str]:
    """Column names of the first data file under `uri`."""
    fs, files = resolve_files(uri)
    with fs.open_input_file(files[0]) as f:
        return set(pq.ParquetFile(f).schema_arrow.names)


def predict_dataset(
    model: InferenceModel, uri: str, *, batch_size: int = 0, num_workers: int = 0, device: torch.device | None = None
) -> dict[str, np.ndarray]:
    """Score every row of `uri` (file order).

    Args:
        model: an InferenceModel (artifact or checkpoint).
        uri: Parquet directory, glob, file or URI with the training schema (labels optional).
        batch_size: rows per batch; 0 = the config's data.eval_batch_size.
        num_workers: reader processes (0 = read here).
        device: where to run the model (default CPU).

    Returns:
        {"row_id", "user_id", "p_<task>"..., "<label>"... for the labels present}: N-row numpy columns.
    """
    cfg = model.cfg
    have = _columns_of(uri)
    data, features = copy.deepcopy(cfg.data), copy.deepcopy(cfg.features)
    labels = [c for c in features.labels if c in have]
    features.labels = labels
    if features.user_id not in have:
        features.user_id = ""
    if data.row_id_column not in have:
        data.row_id_column = ""
    plan = plan_dataset(uri, data, features)
    loader = ParquetLoader(
        plan,
        data,
        features,
        rank=0,
        world_size=1,
        batch_size=batch_size or data.eval_batch_size,
        seed=0,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
    )
    probs, label_rows, users, rows = [], [], [], []
    for p_BK, batch in iter_scores(model, iter(loader), device or torch.device("cpu")):
        probs.append(p_BK)
        label_rows.append(batch.labels)
        users.append(batch.user_ids)
        rows.append(batch.row_ids)
    p_NK = torch.cat(probs).numpy()
    y_NK = torch.cat(label_rows).numpy()
    out: dict[str, np.ndarray] = {"row_id": torch.cat(rows).numpy(), "user_id": torch.cat(users).numpy()}
    for k, task in enumerate(model.tasks):
        out[f"p_{task}"] = p_NK[:, k]
    for k, name in enumerate(labels):
        out[name] = y_NK[:, k]
    return out


def prediction_metrics(cols: dict[str, np.ndarray], tasks: list[str]) -> dict[str, dict[str, float]]:
    """AUC / UAUC / logloss / NE / count per task whose label column is in `cols` ({} when none is)."""
    present = [t for t in tasks if t in cols]
    if not present:
        return {}
    acc = EvalAccumulator(present)
    probs_NK = torch.from_numpy(np.stack([cols[f"p_{t}"] for t in present], 1))
    labels_NK = torch.from_numpy(np.stack([cols[t] for t in present], 1))
    n = probs_NK.shape[0]
    acc.update(probs_NK, labels_NK, torch.from_numpy(cols["user_id"]), torch.ones(n))
    return acc.compute()


def write_predictions(cols: dict[str, np.ndarray], out: Path) -> None:
    """One Parquet file, one row per scored input row."""
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), str(out))


def print_metrics(metrics: dict[str, dict[str, float]], file: Any = None) -> None:
    for task, m in metrics.items():
        print(
            f"{task}: auc {m['auc']:.4f}  uauc {m['uauc']:.4f}  logloss {m['logloss']:.4f}  ne {m['ne']:.4f}  "
            f"rows {m['count']}",
            file=file or sys.stdout,
        )


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
    device = detect_runtime().device
    try:
        model, _ = load_artifact(Path(args.artifact), dtype=args.dtype, device=device)
        cols = predict_dataset(
            model, args.data, batch_size=args.batch_size, num_workers=args.num_workers, device=device
        )
    except (ServingError, DataError) as e:
        raise SystemExit(f"predict: {e}") from None
    out = Path(args.out)
    write_predictions(cols, out)
    metrics = prediction_metrics(cols, model.tasks)
    print(f"predict: {len(cols['row_id'])} rows -> {out}")
    print_metrics(metrics)
    return {"rows": int(len(cols["row_id"])), "out": str(out), "metrics": metrics}


if __name__ == "__main__":
    main()
