"""Convert Criteo click logs (TSV) into this project's Parquet schema, streaming.

    python -m pipeline.tools.criteo --out data/criteo day_0.gz day_1.gz ... [--eval-last 1]
    python -m pipeline.tools.criteo --print-features        # the matching [features] block for a config

Input: one row per line, tab-separated: label, I1..I13 (integers, may be negative), C1..C26
(hexadecimal ids, usually 8 digits); any field but the label may be empty. Files may be plain or
gzip (by the .gz suffix); many files (day_0..day_23) are converted in the order given, each in
chunks of --chunk-rows (memory stays bounded), one Parquet file per input.

Output columns: row_id int64 (0, 1, ... over all inputs, in order), label int8, I1..I13 float32
(log(1 + max(x, 0)), the usual DLRM transform; --raw-dense keeps x), C1..C26 int64 (the hex value).
Missing values stay null: the pipeline repairs them when reading (dense -> 0, ids -> empty bag) and
counts them. Bad input fails with a one-line DataError naming file, column and line: a label other
than 0/1, a wrong number of fields, a malformed hex id. With --eval-last K the last K inputs go to
OUT/eval, the rest to OUT/train.
"""

from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import DataError

DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
NAMES = ["label", *DENSE, *SPARSE]
KAGGLE_CARDINALITY = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992, 5461306,
    10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
"""Distinct values of C1..C26 in the Criteo Kaggle (7-day) set: the default vocab sizes (capped)."""

_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _c in range(10):
    _NIBBLE[ord("0") + _c] = _c
for _c in range(6):
    _NIBBLE[ord("a") + _c] = _NIBBLE[ord("A") + _c] = 10 + _c


def features_block(vocab_cap: int = 1_000_000, dim: int = 16) -> str:
    """The [features] TOML block matching the converted files."""
    lines = [
        "[features]",
        'labels = ["label"]',
        'user_id = ""  # Criteo has no user id: UAUC is off',
        "dense = [" + ", ".join(f'"{d}"' for d in DENSE) + "]",
        'groups = ["categorical"]  # the 26 ids are anonymous: one group',
        "sparse = [",
    ]
    for name, card in zip(SPARSE, KAGGLE_CARDINALITY):
        lines.append(
            f'  {{ name = "{name}", group = "categorical", vocab_size = {min(card, vocab_cap)}, dim = {dim} }},'
        )
    return "\n".join([*lines, "]"]) + "\n"


def parse_hex(arr: pa.Array, path: str, column: str, first_line: int) -> pa.Array:
    """Hex strings -> int64 (nulls kept), vectorised over strings one digit position at a time."""
    arr = arr.cast(pa.large_string())
    n = len(arr)
    valid = np.asarray(arr.is_valid()) if arr.null_count else np.ones(n, dtype=bool)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.where(valid, offsets[1:] - offsets[:-1], 0)
    bad = valid & ((lengths == 0) | (lengths > 16))
    out = np.zeros(n, dtype=np.uint64)
    for j in range(int(lengths.max(initial=0))):
        live = np.nonzero(lengths > j)[0]
        nib = _NIBBLE[data[starts[live] + j]]
        bad[live[nib == 255]] = True
        out[live] = (out[live] << np.uint64(4)) | nib.astype(np.uint64)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{path}: column '{column}' line {first_line + i}: not a hexadecimal id of 1-16 digits")
    return pa.array(out.view(np.int64), mask=~valid)


def _open(path: str) -> pacsv.CSVStreamingReader:
    stream = pa.input_stream(path, compression="gzip" if path.endswith(".gz") else None)
    types = {"label": pa.int64(), **dict.fromkeys(DENSE, pa.int64()), **dict.fromkeys(SPARSE, pa.string())}
    return pacsv.open_csv(
        stream,
        read_options=pacsv.ReadOptions(column_names=NAMES, block_size=1 << 22),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False),
        convert_options=pacsv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=True),
    )


def convert_chunk(rb: pa.RecordBatch, path: str, first_row_id: int, first_line: int, raw_dense: bool) -> pa.Table:
    """One parsed TSV chunk -> the output schema (validates labels and ids)."""
    label = rb.column(0)
    if label.null_count:
        i = int(np.argmax(~np.asarray(label.is_valid())))
        raise DataError(f"{path}: column 'label' line {first_line + i}: missing label; expected 0 or 1")
    y = label.to_numpy()
    bad = (y != 0) & (y != 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{path}: column 'label' line {first_line + i}: label {y[i]} is not 0 or 1")
    cols = {"row_id": pa.array(np.arange(first_row_id, first_row_id + rb.num_rows, dtype=np.int64))}
    cols["label"] = pa.array(y.astype(np.int8))
    for name in DENSE:
        a = rb.column(name)
        x = a.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN
        x = x if raw_dense else np.log1p(np.maximum(x, 0.0))
        cols[name] = pa.array(x.astype(np.float32), mask=~np.asarray(a.is_valid()) if a.null_count else None)
    for name in SPARSE:
        cols[name] = parse_hex(rb.column(name), path, name, first_line)
    return pa.table(cols)


def convert_file(
    path: str, out: Path, first_row_id: int, *, chunk_rows: int, row_group_size: int, compression: str, raw_dense: bool
) -> int:
    """Convert one TSV file into `out`; returns the rows written."""
    rows = 0
    writer = None
    pending: list[pa.Table] = []
    pending_rows = 0
    try:
        reader = None
        while True:
            try:
                reader = reader or _open(path)
                rb = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as e:
                msg = str(e).splitlines()[0][:200]
                raise DataError(
                    f"{path}: bad TSV after line {rows}: {msg} (expected 40 tab-separated fields)"
                ) from None
            table = convert_chunk(rb, path, first_row_id + rows, rows + 1, raw_dense)
            rows += table.num_rows
            pending.append(table)
            pending_rows += table.num_rows
            while pending_rows >= max(chunk_rows, row_group_size):
                t = pa.concat_tables(pending)
                writer = writer or pq.ParquetWriter(out, t.schema, compression=compression, write_page_checksum=True)
                writer.write_table(t, row_group_size=row_group_size)
                pending, pending_rows = [], 0
        if pending_rows or writer is None:
            t = pa.concat_tables(pending) if pending else convert_chunk(_empty_batch(), path, 0, 1, raw_dense)
            writer = writer or pq.ParquetWriter(out, t.schema, compression=compression, write_page_checksum=True)
            writer.write_table(t, row_group_size=row_group_size)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    finally:
        if writer is not None:
            writer.close()
    return rows


def _empty_batch() -> pa.RecordBatch:
    types = [pa.int64()] * 14 + [pa.string()] * 26
    return pa.RecordBatch.from_arrays([pa.array([], t) for t in types], names=NAMES)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m pipeline.tools.criteo", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="*", help="Criteo TSV files or globs (plain or .gz), converted in this order")
    p.add_argument("--out", default="", help="output directory")
    p.add_argument("--eval-last", type=int, default=0, help="send the last K inputs to OUT/eval, the rest to OUT/train")
    p.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows buffered before writing")
    p.add_argument("--row-group-size", type=int, default=65536)
    p.add_argument("--compression", default="zstd")
    p.add_argument("--raw-dense", action="store_true", help="keep I1..I13 as is instead of log(1 + max(x, 0))")
    p.add_argument("--print-features", action="store_true", help="print the matching [features] block and exit")
    p.add_argument("--vocab-cap", type=int, default=1_000_000, help="largest vocab_size in --print-features")
    a = p.parse_args(argv)
    if a.print_features:
        print(features_block(a.vocab_cap), end="")
        return {}
    if not a.inputs or not a.out:
        p.error("give --out and at least one input file (or --print-features)")
    paths = [f for pat in a.inputs for f in (sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat])]
    if not 0 <= a.eval_last < len(paths) + (a.eval_last == 0):
        p.error(f"--eval-last {a.eval_last} must leave at least one training file ({len(paths)} inputs)")
    t0, row_id, counts = time.time(), 0, {"train": 0, "eval": 0}
    for i, path in enumerate(paths):
        split = "eval" if i >= len(paths) - a.eval_last else "train"
        (Path(a.out) / split).mkdir(parents=True, exist_ok=True)
        dest = Path(a.out) / split / f"part-{i:05d}.parquet"
        n = convert_file(
            path, dest, row_id, chunk_rows=a.chunk_rows, row_group_size=a.row_group_size,
            compression=a.compression, raw_dense=a.raw_dense,
        )  # fmt: skip
        row_id += n
        counts[split] += n
        print(f"{path} -> {dest}: {n} rows")
    print(f"converted {row_id} rows in {time.time() - t0:.1f} s")
    return {"rows": row_id, **counts}


if __name__ == "__main__":
    main()
