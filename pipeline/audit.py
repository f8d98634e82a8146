"""Exactly-once audit: an order-independent fingerprint of the row ids an epoch consumed.

    audit = {"count": number of real rows, "checksum": sum(mix64(row_id)) mod 2**64}

Sums commute, so the per-rank audits of an epoch add up (counts summed, checksums summed mod
2**64, see `combine_audits`) to the audit of the whole dataset (`dataset_audit`) exactly when every
row was consumed once: a duplicated or skipped row changes the count or the checksum.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.errors import DataError
from pipeline.ids import mix64
from pipeline.plan import DatasetPlan, WorkUnit

MOD = 2**64


def checksum_ids(row_ids: np.ndarray) -> int:
    """sum(mix64(id)) mod 2**64 of an int64 array, as a Python int."""
    if len(row_ids) == 0:
        return 0
    return int(mix64(row_ids).sum(dtype=np.uint64))  # uint64 sums wrap: the mod is free


def combine_audits(audits: list[dict]) -> dict:
    """Sum per-rank audits: {"count": sum of counts, "checksum": sum of checksums mod 2**64} (the
    "epoch" key of the inputs, when present and equal, is kept)."""
    out = {"count": sum(int(a["count"]) for a in audits), "checksum": sum(int(a["checksum"]) for a in audits) % MOD}
    epochs = {a.get("epoch") for a in audits}
    if len(epochs) == 1 and None not in epochs:
        out["epoch"] = epochs.pop()
    return out


def dataset_audit(plan: DatasetPlan, data: DataConfig, units: list[WorkUnit] | None = None) -> dict:
    """{"count", "checksum"} of every row id in the plan (or in `units`, e.g. the rows drop_last leaves out
    of an epoch), reading only the row-id column: the yardstick an epoch must match (summed over ranks).

    Raises:
        DataError when `data.row_id_column` is empty (no audit without row ids).
    """
    col = data.row_id_column
    if not col:
        raise DataError("data.row_id_column is empty: the dataset has no row ids to audit")
    count, checksum = 0, 0
    by_file: dict[int, list] = {}
    for u in plan.units if units is None else units:
        by_file.setdefault(u.file_index, []).append(u)
    for fi, file_units in sorted(by_file.items()):
        path = plan.files[fi]
        with plan.filesystem.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for u in file_units:
                ids = pf.read_row_group(u.row_group, columns=[col]).column(0).to_numpy()[u.start : u.stop]
                count += len(ids)
                checksum = (checksum + checksum_ids(ids.astype(np.int64))) % MOD
    return {"count": count, "checksum": checksum}
