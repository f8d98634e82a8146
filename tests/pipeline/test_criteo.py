"""The Criteo TSV converter: plain and gzip, missing values, row ids, bad input, the features block."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from config import load_config
from pipeline.errors import DataError
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset
from pipeline.tools.criteo import features_block, main


def _lines(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ints = ["" if rng.random() < 0.2 else str(int(rng.integers(-3, 1000))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 2**32)):08x}" for _ in range(26)]
        out.append("\t".join([str(int(rng.integers(0, 2))), *ints, *cats]))
    return out


def test_convert_plain_and_gzip(tmp_path):
    a, b = _lines(120, 0), _lines(80, 1)
    (tmp_path / "day_0").write_text("\n".join(a) + "\n")
    with gzip.open(tmp_path / "day_1.gz", "wt") as f:
        f.write("\n".join(b) + "\n")
    out = tmp_path / "out"
    res = main([str(tmp_path / "day_0"), str(tmp_path / "day_1.gz"), "--out", str(out), "--eval-last", "1",
                "--chunk-rows", "50", "--row-group-size", "32"])  # fmt: skip
    assert res == {"rows": 200, "train": 120, "eval": 80}
    train, evals = pq.read_table(out / "train"), pq.read_table(out / "eval")
    assert train.column("row_id").to_pylist() == list(range(120))
    assert evals.column("row_id").to_pylist() == list(range(120, 200))
    assert pq.ParquetFile(out / "train" / "part-00000.parquet").metadata.num_row_groups > 1
    for table, lines in ((train, a), (evals, b)):
        fields = [line.split("\t") for line in lines]
        assert table.column("label").to_pylist() == [int(f[0]) for f in fields]
        i2 = [None if f[2] == "" else math.log1p(max(int(f[2]), 0)) for f in fields]
        got = table.column("I2").to_pylist()
        assert all((x is None and y is None) or abs(x - y) < 1e-5 for x, y in zip(got, i2))
        assert table.column("C7").to_pylist() == [None if f[20] == "" else int(f[20], 16) for f in fields]


def test_features_block_loads_and_reads(tmp_path):
    (tmp_path / "day_0").write_text("\n".join(_lines(64, 2)) + "\n")
    main([str(tmp_path / "day_0"), "--out", str(tmp_path / "out")])
    cfg_file = tmp_path / "criteo.toml"
    cfg_file.write_text(features_block(vocab_cap=1000))
    cfg = load_config(["--config", str(cfg_file)])
    plan = plan_dataset(str(tmp_path / "out" / "train"), cfg.data, cfg.features)
    loader = ParquetLoader(
        plan, cfg.data, cfg.features, rank=0, world_size=1, batch_size=16, seed=0, shuffle=True, drop_last=True,
        num_workers=0,
    )  # fmt: skip
    batches = list(loader)
    assert len(batches) == 4 and batches[0].labels.shape == (16, 1) and batches[0].dense.shape == (16, 13)
    assert loader.stats()["nulls_repaired"] > 0  # missing ints and ids were repaired and counted
    v = batches[0].sparse.to_dict()["C3"].values()
    assert ((v >= 0) & (v < 1000)).all()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: ["2", *f[1:]], r"day_0: column 'label' line 3: label 2 is not 0 or 1"),
        (lambda f: f[:-1], r"day_0: bad TSV .*expected 40 tab-separated fields"),
        (lambda f: [*f[:20], "zz12", *f[21:]], r"day_0: column 'C7' line 3: not a hexadecimal id"),
    ],
)
def test_bad_input_named(tmp_path, mutate, message):
    lines = _lines(5, 3)
    lines[2] = "\t".join(mutate(lines[2].split("\t")))
    (tmp_path / "day_0").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        main([str(tmp_path / "day_0"), "--out", str(tmp_path / "out")])
