"""Score a Parquet dataset with an exported artifact, in a fresh process.

    python -m launch.predict --artifact artifacts/tiny --data data/tiny/eval --out preds.parquet

Reads the data with the pipeline's ParquetLoader (file order, one process, no row dropped; the
zero-weight padding rows of the last batch are skipped), scores every row with the artifact's
InferenceModel (sparse-inference router) and writes one Parquet row per input row:

    row_id, user_id, p_<task> for every task, and <label> for every label column the data has

When labels are present it prints AUC / UAUC / logloss / NE per task. Unlabeled data works: the
label and user-id columns the data (or the config) lacks are left out, and row_id is -1 without a
row-id column; without user ids UAUC is NaN.

Legend: B batch, K tasks.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from metrics.auc import EvalAccumulator
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset, resolve_files
from serving.model import InferenceModel, iter_scores


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
        {"row_id", "user_id" (when there are user ids), "p_<task>"..., "<label>"... for the labels present}:
        N-row numpy columns.
    """
    cfg = model.cfg
    have = _columns_of(uri)
    data, features = copy.deepcopy(cfg.data), copy.deepcopy(cfg.features)
    labels = [c for c in features.labels if c in have]
    features.labels = labels
    if features.user_id not in have:
        features.user_id = ""
    if features.item_id not in have:  # only the report's baselines read it
        features.item_id = ""
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
        vocabs=model.vocabs,
    )
    probs, label_rows, users, rows = [], [], [], []
    for p_BK, batch in iter_scores(model, iter(loader), device or torch.device("cpu")):
        probs.append(p_BK)
        label_rows.append(batch.labels)
        users.append(batch.user_ids)
        rows.append(batch.row_ids)
    p_NK = torch.cat(probs).numpy()
    y_NK = torch.cat(label_rows).numpy()
    out: dict[str, np.ndarray] = {"row_id": torch.cat(rows).numpy()}
    if features.user_id:
        out["user_id"] = torch.cat(users).numpy()
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
    acc = EvalAccumulator(present, users="user_id" in cols)
    probs_NK = torch.from_numpy(np.stack([cols[f"p_{t}"] for t in present], 1))
    labels_NK = torch.from_numpy(np.stack([cols[t] for t in present], 1))
    n = probs_NK.shape[0]
    users_N = torch.from_numpy(cols["user_id"]) if "user_id" in cols else torch.zeros(n, dtype=torch.int64)
    acc.update(probs_NK, labels_NK, users_N, torch.ones(n))
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
