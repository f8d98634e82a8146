"""Evaluation-metric memory and time per rank against the number of eval rows (one process).

    python -m bench.eval [--json FILE] [--rows 100000,1000000,10000000] [--batch 65536]

For each size, the same synthetic rows (2 tasks, ~rows/8 users, weights in {0, 1, 2}) go through
`metrics.streaming.StreamingEvalAccumulator` without and with UAUC and through the exact
`metrics.auc.EvalAccumulator`; reported: the bytes each holds when `compute()` starts (on one rank:
the exact path all-gathers every rank's rows, so on W ranks it holds W times its own share; the
histogram path holds its fixed grids plus, for UAUC, about 1/W of the rows), the seconds of updates
and of compute, and the histogram AUC's distance to the exact one next to its reported bound.

Legend: B batch rows, K tasks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from bench import write_json
from metrics.auc import EvalAccumulator
from metrics.streaming import StreamingEvalAccumulator

TASKS = ["click", "finish"]
CPU = torch.device("cpu")


def _batches(rows: int, batch: int) -> Any:
    """Deterministic B x 2 probabilities, labels, user ids and weights, `rows` in all."""
    g = torch.Generator().manual_seed(0)
    done = 0
    while done < rows:
        n = min(batch, rows - done)
        z = torch.randn(n, 2, generator=g)
        p = torch.sigmoid(z - 2.0)
        y = (torch.rand(n, 2, generator=g) < torch.sigmoid(1.5 * z - 2.0)).float()
        users = torch.randint(0, max(1, rows // 8), (n,), generator=g)
        w = torch.randint(0, 3, (n,), generator=g).float()
        done += n
        yield p, y, users, w


def _held_bytes(acc: Any) -> int:
    if isinstance(acc, StreamingEvalAccumulator):
        return acc.memory_bytes()
    return sum(t.numel() * t.element_size() for t in acc._vals + acc._users)


def measure(rows: int, batch: int) -> dict[str, Any]:
    """One size: every accumulator's bytes, update and compute seconds, AUC error against exact."""
    accs = {
        "histogram": StreamingEvalAccumulator(TASKS, CPU, users=False),
        "histogram_uauc": StreamingEvalAccumulator(TASKS, CPU, users=True),
        "exact": EvalAccumulator(TASKS, device=CPU),
    }
    out: dict[str, Any] = {"rows": rows}
    results = {}
    for name, acc in accs.items():
        t0 = time.perf_counter()
        for b in _batches(rows, batch):
            acc.update(*b)
        t1 = time.perf_counter()
        held = _held_bytes(acc)
        results[name] = acc.compute()
        out[name] = {"bytes": held, "update_s": t1 - t0, "compute_s": time.perf_counter() - t1}
    for t in TASKS:
        h, e = results["histogram"][t], results["exact"][t]
        out[f"auc_error_{t}"] = abs(h["auc"] - e["auc"])
        out[f"auc_bound_{t}"] = h["auc_bound"]
        out[f"uauc_error_{t}"] = abs(results["histogram_uauc"][t]["uauc"] - e["uauc"])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every size, print a table, optionally write JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--rows", default="100000,1000000,10000000", help="eval sizes (comma-separated)")
    p.add_argument("--batch", type=int, default=65536, help="rows per update")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.rows.split(",") if x]
    res: dict[str, Any] = {"sizes": [measure(n, args.batch) for n in sizes]}
    print(f"{'rows':>10s} {'histogram':>12s} {'hist+uauc':>12s} {'exact':>12s}   (bytes held per rank, 1 rank)")
    for r in res["sizes"]:
        cells = " ".join(f"{r[k]['bytes'] / 2**20:10.1f}MB" for k in ("histogram", "histogram_uauc", "exact"))
        print(f"{r['rows']:>10,d} {cells}   auc error {r['auc_error_click']:.1e} (bound {r['auc_bound_click']:.1e})")
    for r in res["sizes"]:
        times = "  ".join(
            f"{k} {r[k]['update_s']:.1f}+{r[k]['compute_s']:.1f}s" for k in ("histogram", "histogram_uauc", "exact")
        )
        print(f"{r['rows']:>10,d} update+compute: {times}")
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
