"""Id mapping (range, stability across processes), string hashing, file listing and URIs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from pipeline.ids import hash_strings, mix64
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset, resolve_files
from tests.pipeline.fixtures import data_config, small_features, write_dataset
from tests.pipeline.ids_ref import map_ids

IDS = np.array([0, 1, -1, 2**62, -(2**63), 123456789, 99], dtype=np.int64)


@pytest.mark.parametrize("vocab", [1, 7, 1000, 2**31 + 11])
def test_map_ids_in_range(vocab):
    for mode in ("hash", "modulo"):
        out = map_ids(IDS, vocab, mode)
        assert out.dtype == np.int64 and ((out >= 0) & (out < vocab)).all()
    assert np.array_equal(map_ids(IDS, vocab, "raw"), IDS)
    mod = map_ids(IDS, 1000, "modulo")
    assert mod[0] == 0 and mod[1] == 1 and mod[6] == 99  # in range: kept


def test_mix64_known_values_and_bijective():
    # splitmix64 reference: the first output of the splitmix64 generator seeded with 0
    assert int(mix64(np.array([0], np.int64))[0]) == 0xE220A8397B1DCDAF
    x = np.arange(-5000, 5000, dtype=np.int64)
    assert len(np.unique(mix64(x))) == len(x)


def test_ids_stable_across_processes():
    code = (
        "import numpy as np, pyarrow as pa; from pipeline.ids import hash_strings;"
        "from tests.pipeline.ids_ref import map_ids;"
        f"ids = np.array({IDS.tolist()}, dtype=np.int64);"
        "print(map_ids(ids, 1000, 'hash').tolist(), hash_strings(pa.array(['a', 'bc', '', None]))[0].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    here = f"{map_ids(IDS, 1000, 'hash').tolist()} {hash_strings(pa.array(['a', 'bc', '', None]))[0].tolist()}"
    assert out == here


def test_hash_strings():
    ids, valid = hash_strings(pa.chunked_array([pa.array(["x", "y", None]), pa.array(["x", "yy"])]))
    assert valid.tolist() == [True, True, False, True, True]
    assert ids[0] == ids[3] and len({ids[0], ids[1], ids[4]}) == 3 and ids[2] == 0
    large, _ = hash_strings(pa.array(["x", "yy"], pa.large_string()))
    assert large.tolist() == [ids[0], ids[4]]


def test_listing_dir_glob_file_and_file_uri(tmp_path):
    root, ids = write_dataset(tmp_path / "ds", [[3], [4], [2, 2]])
    (root / "_SUCCESS").write_text("")
    (root / ".part-000.parquet.crc").write_text("x")
    _, files = resolve_files(str(root))
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-000.parquet", "part-001.parquet", "part-002.parquet"]
    _, globbed = resolve_files(str(root / "part-00[12].parquet"))
    assert globbed == files[1:]
    _, single = resolve_files(files[0])
    assert single == files[:1]
    data, feats = data_config(root), small_features()
    plan = plan_dataset(f"file://{root}", data, feats)
    assert plan.files == files and plan.num_rows == len(ids) and len(plan.units) == 4
    loader = ParquetLoader(
        plan, data, feats, rank=0, world_size=1, batch_size=4, seed=0, shuffle=True, drop_last=False, num_workers=1
    )
    assert sorted(int(x) for b in loader for x in b.row_ids[b.weights > 0]) == ids.tolist()
