"""Write an inference artifact from a run's latest checkpoint: no pickle, loadable in a fresh process.

    python -m launch.export --run runs/tiny [--out DIR] [--quantize int8] [--checkpoint PATH]

The artifact's layout and what is quantized: serving/export.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from parallel.env import setup_env


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: `--run DIR [--out DIR] [--quantize int8] [--checkpoint PATH] [--eval-data PATH] [--section.field v]`."""
    p = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory (config.toml + checkpoints/)")
    p.add_argument("--out", default="", help="artifact directory (default <run>/artifact[_int8])")
    p.add_argument(
        "--checkpoint",
        default="",
        help="a checkpoint directory (default: checkpoints/best if the run kept one, else the latest complete one)",
    )
    p.add_argument("--quantize", choices=("none", "int8"), default="none", help="int8: INT8 embedding tables")
    p.add_argument("--eval-data", default=None, help="labelled data to measure AUC on (default data.eval; '' skips)")
    args, rest = p.parse_known_args(argv)
    setup_env()
    # after parsing (--help answers at once) and setup_env (TORCH_EXTENSIONS_DIR, DS_ACCELERATOR): torch loads here
    from checkpoint.format import CheckpointError
    from pipeline.errors import DataError
    from serving.export import default_out, export
    from serving.model import ServingError

    try:
        manifest = export(
            Path(args.run),
            Path(args.out) if args.out else None,
            checkpoint=Path(args.checkpoint) if args.checkpoint else None,
            quantize=args.quantize,
            eval_data=args.eval_data,
            overrides=rest,
        )
    except (ServingError, CheckpointError, DataError) as e:
        raise SystemExit(f"export: {e}") from None
    sizes = manifest["sizes"]
    out = args.out or default_out(Path(args.run), args.quantize)
    print(
        f"export: {manifest['checkpoint']} (step {manifest['step']}) -> {out}  "
        f"tables {sizes['tables_bytes'] / 2**20:.2f} MiB ({manifest['quantization']['tables']}, "
        f"{sizes['tables_saved_pct']:.1f}% saved)  dense program: {manifest['dense_program']['status']}"
    )
    for key, value in manifest.get("eval", {}).items():
        if key.startswith("auc_change"):
            print(f"  {key}: " + "  ".join(f"{t} {v:+.5f}" for t, v in value.items()))
    return manifest


if __name__ == "__main__":
    main()
