"""Tiny Parquet datasets for the pipeline tests, written with pyarrow into a tmp directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataConfig, FeaturesConfig, SparseFeature
from pipeline.loader import ParquetLoader
from pipeline.plan import DatasetPlan


def small_features(vocab: int = 50, id_mapping: str = "hash", string_feature: bool = False) -> FeaturesConfig:
    """Two labels, two dense, two scalar ids (one optionally a string), one list<int64> (max_len 3)."""
    return FeaturesConfig(
        labels=["click", "finish"],
        user_id="user_id",
        dense=["d0", "d1"],
        sparse=[
            SparseFeature(name="u0", group="user", vocab_size=vocab, id_mapping=id_mapping),
            SparseFeature(
                name="i0", group="item", vocab_size=vocab, id_mapping=id_mapping,
                dtype="string" if string_feature else "int64",
            ),
            SparseFeature(name="s_item", group="sequence", vocab_size=vocab, max_len=3, id_mapping=id_mapping),
        ],
    )  # fmt: skip


def make_table(row_ids: np.ndarray, seed: int = 0, string_feature: bool = False) -> pa.Table:
    """Rows whose content is a function of the row id (so tests can recompute what a row holds)."""
    rng = np.random.default_rng(seed)
    n = len(row_ids)
    lens = (row_ids % 5).astype(np.int32)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lens, out=offsets[1:])
    seq_vals = np.concatenate([np.arange(r, r + k) for r, k in zip(row_ids, lens)]) if n else np.zeros(0)
    i0 = row_ids * 7
    return pa.table(
        {
            "row_id": pa.array(row_ids, pa.int64()),
            "user_id": pa.array(row_ids // 3, pa.int64()),
            "click": pa.array(row_ids % 2, pa.int64()),
            "finish": pa.array((row_ids // 2) % 2, pa.float32()),
            "d0": pa.array(row_ids.astype(np.float32), pa.float32()),
            "d1": pa.array(rng.normal(size=n).astype(np.float32)),
            "u0": pa.array(row_ids // 3, pa.int64()),
            "i0": pa.array([f"item{x}" for x in i0]) if string_feature else pa.array(i0, pa.int64()),
            "s_item": pa.ListArray.from_arrays(pa.array(offsets), pa.array(seq_vals.astype(np.int64))),
        }
    )


def write_dataset(
    root: Path, layout: list[list[int]], start: int = 0, string_feature: bool = False
) -> tuple[Path, np.ndarray]:
    """Write one file per entry of `layout` (row-group sizes, e.g. [[5, 3], [7], [1, 4, 2]]) with
    consecutive row ids from `start`. Returns (directory, all row ids)."""
    root.mkdir(parents=True, exist_ok=True)
    rid = start
    for i, groups in enumerate(layout):
        tables = []
        for g in groups:
            tables.append(make_table(np.arange(rid, rid + g, dtype=np.int64), seed=rid, string_feature=string_feature))
            rid += g
        with pq.ParquetWriter(root / f"part-{i:03d}.parquet", tables[0].schema) as w:
            for t in tables:
                w.write_table(t, row_group_size=max(1, t.num_rows))
    return root, np.arange(start, rid, dtype=np.int64)


def data_config(path: Path | str, **kw) -> DataConfig:
    """A DataConfig for tests (tiny shuffle window so windows matter)."""
    base = dict(train=str(path), eval="", shuffle_window=8, num_workers=0, prefetch_row_groups=2)
    base.update(kw)
    return DataConfig(**base)


def ordered_loader(plan: DatasetPlan, root: Path | str, features: FeaturesConfig, vocabs: dict) -> ParquetLoader:
    """One rank reading every row of `plan` in file order (no shuffle, the tail padded), batches of 500,
    ids mapped through `vocabs`: what the vocabulary tests compare row by row against a reference."""
    return ParquetLoader(
        plan, data_config(root, row_id_column="", shuffle_window=500), features, rank=0, world_size=1,
        batch_size=500, seed=0, shuffle=False, drop_last=False, num_workers=0, vocabs=vocabs,
    )  # fmt: skip
