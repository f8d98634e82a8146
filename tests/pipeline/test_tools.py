"""inspect and the pipeline benchmark run end to end on tiny data; the id memo table is exact."""

from __future__ import annotations

import json

import numpy as np

from bench.pipeline import main as bench_main
from pipeline import ids
from pipeline.tools.inspect import main as inspect_main
from pipeline.tools.synth import main as synth_main
from tests.pipeline.fixtures import write_dataset


def test_inspect_without_and_with_config(tmp_path):
    root, _ = write_dataset(tmp_path / "ds", [[5, 3], [7]])
    text = inspect_main([str(root), "--world-size", "2", "--num-workers", "2", "--batch-size", "2"])
    assert "2 files, 15 rows, 3 row groups" in text and "part-001.parquet" in text
    assert "s_item: list<element: int64>" in text
    assert text.count("  rank ") == 2 and "3 batches per rank" in text
    synth_main(["--out", str(tmp_path / "syn"), "--rows", "3000", "--files", "2", "--seed", "0"])
    text = inspect_main([str(tmp_path / "syn" / "train"), "--config", "configs/tiny.toml", "--world-size", "3"])
    assert "batch 64 (drop_last, shuffle=True" in text and text.count("  rank ") == 3


def test_memo_table_matches_direct_hash():
    rng = np.random.default_rng(0)
    small = rng.integers(0, ids.MEMO_IDS, 10_000)
    mixed = np.concatenate([small, [-5, 2**40]])
    for vocab in (1000, 99_991):
        via_memo, via_direct = np.empty_like(small), np.empty_like(mixed)
        ids.map_ids_into(small, vocab, "hash", via_memo)
        ids.map_ids_into(mixed, vocab, "hash", via_direct)  # out-of-table ids: the direct path
        direct = ids._mod(ids.mix64(small), vocab)
        assert np.array_equal(via_memo, direct)
        assert np.array_equal(via_direct[:-2], direct)


def test_bench_pipeline_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = bench_main(["--rows", "20000", "--files", "2", "--workers", "0,1", "--repeats", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    for key in ("pyarrow_rows_per_cpu_s", "pipeline_rows_per_cpu_s", "ratio_vs_pyarrow"):
        assert saved[key] == res[key] and res[key] > 0
    assert saved["workers_1"]["rows_per_cpu_s"] > 0
