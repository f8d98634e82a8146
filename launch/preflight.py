"""`python -m launch.preflight --config FILE [overrides]`: what launch/train.sh runs once, before torchrun.

Validates the config for the job's world size and plans every split from the Parquet footers (train,
validation, eval: the files exist, are readable, have the configured columns with the right types), in
one process. A deterministic problem is then one line, printed once, with exit code 2, instead of an
error per rank repeated by every elastic restart. Takes the same arguments as launch.train;
NNODES x NPROC_PER_NODE (or WORLD_SIZE) is the world size it checks against.
"""

from __future__ import annotations

import os
import sys

from config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    """0 when the job can start; else prints one line naming the key or file and returns 2."""
    argv = sys.argv[1:] if argv is None else argv
    nodes, per_node = int(os.environ.get("NNODES", "1")), int(os.environ.get("NPROC_PER_NODE", "1"))
    world = int(os.environ.get("WORLD_SIZE", nodes * per_node))
    try:
        cfg = load_config(argv, world_size=world)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    # reading footers needs pyarrow only: no torch, no process group
    from pipeline.errors import DataError
    from pipeline.plan import carve_tail, plan_dataset

    d, f = cfg.data, cfg.features
    try:
        plan = plan_dataset(d.train, d, f)
        if d.valid_fraction > 0:
            carve_tail(plan, d.valid_fraction)
        for uri in (d.valid, d.eval):
            if uri:
                plan_dataset(uri, d, f)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
