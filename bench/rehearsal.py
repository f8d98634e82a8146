"""A billion-row rehearsal on one machine: measure what a rank holds and spends as the data grows, for the
default model, and extrapolate to 1e9 rows x 64 ranks.

    python -m bench.rehearsal [--json FILE] [--rows 1e9] [--ranks 64] [--files 10000] [--rows-per-group 131072]

Measured here, in this run:
  - planning: `plan_dataset` over F copies of one synthetic file for two F (seconds and heap, footers
    only), fitted as a + b x files and a heap per file and per row group;
  - one epoch's loader state: the bytes of `ParquetLoader.state_dict()` at two dataset sizes (it holds
    counters and a fingerprint, no per-row or per-file data);
  - the data pipeline's rows per second per rank (the loader over synthetic data, 1 process, the
    default batch), which bounds an epoch's input time;
  - eval memory: `metrics.streaming.StreamingEvalAccumulator` bytes with UAUC off and on at two sizes.
Computed from the config (exact arithmetic, no measurement needed): the checkpoint per rank (table
shards + fused row-wise Adagrad state split over the ranks, the replicated dense model + Adam moments).

Then a table for `--rows` rows in `--files` files of row groups of `--rows-per-group` rows on `--ranks`
ranks: each line with the measured law it comes from. Figures of one run on this 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import write_json
from bench.plan import fit, link_copies, measure
from config import load_config
from config.job import dense_input_spec
from embeddings.regroup import sparse_dim, sparse_group_widths
from embeddings.tables import table_specs
from metrics.streaming import StreamingEvalAccumulator
from model.zoo import build_model
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset
from pipeline.tools.synth import generate

REPO = Path(__file__).resolve().parent.parent


def measure_plan(root: Path, template: Path, cfg: Any) -> dict[str, float]:
    """Plan seconds and heap at two file counts (`bench.plan.measure`, footer threads on auto) -> the fitted
    seconds per file, the heap per file and the row groups per file (the template's)."""
    rows = [measure(link_copies(root, n, template), 0, cfg.data, cfg.features) for n in (2000, 8000)]
    fixed, per_file = fit([(r["files"], r["seconds"]) for r in rows])
    return {
        "s_fixed": fixed,
        "s_per_file": per_file,
        "heap_bytes_per_file": rows[-1]["heap_bytes_per_file"],
        "groups_per_file": rows[-1]["units"] / rows[-1]["files"],
    }


def measure_loader(data_dir: Path, cfg: Any) -> dict[str, float]:
    """Loader state bytes (two dataset sizes) and rows per second through the loader (1 process)."""
    plan = plan_dataset(str(data_dir / "train"), cfg.data, cfg.features)
    loader = ParquetLoader(
        plan, cfg.data, cfg.features, rank=0, world_size=1, batch_size=cfg.data.batch_size, seed=0,
        shuffle=True, drop_last=True, num_workers=0,
    )  # fmt: skip
    t0, rows = time.perf_counter(), 0
    for batch in loader:
        rows += batch.size
    seconds = time.perf_counter() - t0
    return {"state_bytes": float(len(pickle.dumps(loader.state_dict()))), "rows_per_s": rows / seconds}


def measure_eval(rows: int) -> dict[str, float]:
    """Eval accumulator bytes per rank with UAUC off (flat) and on (rows kept), at `rows` rows."""
    out = {}
    for users in (False, True):
        acc = StreamingEvalAccumulator(["click", "finish"], torch.device("cpu"), users=users)
        g = torch.Generator().manual_seed(0)
        done = 0
        while done < rows:
            n = min(65536, rows - done)
            acc.update(torch.rand(n, 2, generator=g), (torch.rand(n, 2, generator=g) < 0.1).float(),
                       torch.randint(0, rows // 8 + 1, (n,), generator=g), torch.ones(n))  # fmt: skip
            done += n
        out["uauc_bytes" if users else "flat_bytes"] = float(acc.memory_bytes())
    out["uauc_bytes_per_row"] = (out["uauc_bytes"] - out["flat_bytes"]) / rows
    return out


def checkpoint_bytes(cfg: Any, ranks: int) -> dict[str, float]:
    """Checkpoint bytes per rank of the default model: table shards + row-wise Adagrad state (1 float per
    row) split over the ranks; the dense model (replicated; rank 0 writes it) with two Adam moments."""
    f = cfg.features
    specs = table_specs(f, cfg.embeddings)
    table = sum(4 * s.num_embeddings * s.dim for s in specs)
    optim = sum(4 * s.num_embeddings for s in specs)
    model = build_model(
        cfg.model, cfg.moe, sparse_dim=sparse_dim(f), dense=dense_input_spec(f), num_tasks=len(f.labels),
        sparse_groups=sparse_group_widths(f),
    )  # fmt: skip
    dense = 4 * 3 * sum(p.numel() for p in model.parameters())
    return {"tables_per_rank": (table + optim) / ranks, "dense_rank0": float(dense), "tables_total": float(table)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, extrapolate, print the table, optionally write JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.rehearsal", description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--rows", type=float, default=1e9, help="rows of the extrapolated job")
    p.add_argument("--ranks", type=int, default=64, help="ranks of the extrapolated job")
    p.add_argument("--files", type=int, default=10000, help="files of the extrapolated dataset")
    p.add_argument("--rows-per-group", type=int, default=131072, help="rows per Parquet row group there")
    args = p.parse_args(argv)
    cfg = load_config(["--config", str(REPO / "configs" / "default.toml")])
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root / "small", 100, 1, 0, 0.0, 25, "zstd")
        template = next((root / "small" / "train").glob("*.parquet"))
        res["plan"] = measure_plan(root, template, cfg)
        generate(root / "data", 200_000, 4, 0, 0.0, 16384, "zstd")
        res["loader"] = measure_loader(root / "data", cfg)
    res["eval"] = measure_eval(1_000_000)
    res["checkpoint"] = checkpoint_bytes(cfg, args.ranks)

    rows, ranks, files = args.rows, args.ranks, args.files
    groups = rows / args.rows_per_group
    pl, ld, ev, ck = res["plan"], res["loader"], res["eval"], res["checkpoint"]
    per_group = pl["heap_bytes_per_file"] / pl["groups_per_file"]  # an upper bound: the file's share too
    uauc_mb = (ev["flat_bytes"] + ev["uauc_bytes_per_row"] * rows * 0.01 / ranks) / 2**20
    table = [
        ("plan (every rank reads every footer)", f"{pl['s_fixed'] + pl['s_per_file'] * files:.1f} s",
         f"{pl['s_per_file'] * 1e6:.0f} us/file measured (local disk, {os.cpu_count()} cores)"),
        ("plan memory per rank", f"{(pl['heap_bytes_per_file'] * files + per_group * groups) / 2**20:.1f} MB",
         f"{pl['heap_bytes_per_file']:.0f} B/file ({pl['groups_per_file']:.0f} groups) measured"),
        ("loader state (checkpointed)", f"{ld['state_bytes'] / 1024:.1f} KiB", "constant: counters + fingerprint"),
        ("input time per rank per epoch", f"{rows / ranks / ld['rows_per_s']:.0f} s",
         f"{ld['rows_per_s']:,.0f} rows/s per rank measured (1 process)"),
        ("eval memory per rank, AUC/logloss", f"{ev['flat_bytes'] / 2**20:.1f} MB", "flat in rows"),
        ("eval memory per rank, + UAUC (1% of rows as eval)", f"{uauc_mb:.1f} MB",
         f"{ev['uauc_bytes_per_row']:.0f} B per eval row / ranks"),
        ("checkpoint per rank (tables + optimizer)", f"{ck['tables_per_rank'] / 2**20:.2f} MB",
         f"{ck['tables_total'] / 2**20:.0f} MB of tables / {ranks} ranks; grows with vocab, not rows"),
        ("checkpoint, dense model + Adam (rank 0)", f"{ck['dense_rank0'] / 2**20:.1f} MB", "replicated model"),
    ]  # fmt: skip
    res["extrapolated"] = {"rows": rows, "ranks": ranks, "files": files, "table": table}
    print(f"extrapolated to {rows:.0e} rows x {ranks} ranks, {files:,} files, row groups of {args.rows_per_group:,}:")
    for name, value, basis in table:
        print(f"  {name:<52s} {value:>12s}   ({basis})")
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
