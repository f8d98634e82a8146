"""`python -m launch.study`: the quality and scaling study (see study/runner.py for what it runs).

python -m launch.study --config configs/study.toml [--smoke] [--out study/] [--data.train DIR ...]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The study's own flags; everything else is a `--section.field value` override of the base job."""
    p = argparse.ArgumentParser(prog="python -m launch.study", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/study.toml", help="study TOML ([study] + job tables)")
    p.add_argument("--smoke", action="store_true", help="apply [study.smoke]: tiny data, minutes")
    p.add_argument(
        "--out", default="", help="output folder (runs/, results.*, scaling.png); default study/ or study/smoke/"
    )
    p.add_argument("--models", default="", help="comma list: only these arms (and their scaling points)")
    p.add_argument("--seeds", default="", help="comma list of seeds instead of study.seeds")
    p.add_argument("--lr-grid", default="", help="comma list of lrs instead of study.lr_grid")
    p.add_argument(
        "--grid", action="append", default=[], metavar="SECTION.FIELD=V1,V2",
        help="tune this config field jointly with the lr grid (repeatable), e.g. --grid model.dropout=0,0.1",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=0, help="steps per full run (0: training.steps, or one pass)")
    p.add_argument("--jobs", type=int, default=0, help="concurrent runs instead of study.jobs")
    p.add_argument("--scaling", default="", help="comma list: only these scaling points ('none': no sweep)")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the study; returns results.json as a dict (StudyError names what is wrong)."""
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    from study.runner import run_study  # torch loads with it: after parsing, so --help answers at once

    return run_study(args, overrides, argv)


if __name__ == "__main__":
    from pipeline.errors import DataError
    from study.runner import StudyError

    try:
        main()
    except (StudyError, FileNotFoundError, DataError) as e:
        raise SystemExit(f"study error: {e}") from None
