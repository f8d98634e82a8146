"""`make bench`: run every benchmark, each writing bench/results/<name>.json (figures from one run)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

BENCHES = ("pipeline", "model", "train", "serve", "faults", "eval", "plan", "rehearsal", "gpu_check")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results", help="folder for the JSON results")
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHES))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    failed = []
    for name in names:
        t0 = time.perf_counter()
        print(f"\n=== bench.{name} ===", flush=True)
        try:
            mod = importlib.import_module(f"bench.{name}")
            result = mod.main(["--json", str(out / f"{name}.json")])
            print(f"[bench.{name}] {time.perf_counter() - t0:.0f}s -> {out / (name + '.json')}")
            if isinstance(result, int) and not isinstance(result, bool) and result != 0:
                raise RuntimeError(f"exit code {result}")  # gpu_check: a part failed (named in its JSON)
            if isinstance(result, dict) and not (out / f"{name}.json").exists():
                (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        except Exception as e:  # noqa: BLE001 - run the others, then fail
            failed.append(name)
            print(f"[bench.{name}] FAILED: {type(e).__name__}: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
