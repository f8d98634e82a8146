"""`python -m launch.doctor`: versions, whether fbgemm ops load, DeepSpeed's accelerator, the backend.

python -m launch.doctor                          # the report (exit 1 when something is wrong)
python -m launch.doctor --verify-install cuda    # what launch/install.sh runs after installing a variant
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from parallel.env import detect_runtime, gpu_name, install_problems, setup_env
from pipeline import native


def main(argv: list[str] | None = None) -> int:
    """Print the report (or, with --verify-install, only the problems); exit 1 when something is wrong."""
    parser = argparse.ArgumentParser(prog="python -m launch.doctor", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--verify-install",
        choices=["cpu", "cuda"],
        default=None,
        help="check the installed stack against this variant (one line per problem, with the fix)",
    )
    args = parser.parse_args(argv)
    if args.verify_install:
        problems = install_problems(args.verify_install)
        for line in problems:
            print(f"install: {line}", file=sys.stderr)
        return 1 if problems else 0
    setup_env()
    ok = True
    print(f"python        {sys.version.split()[0]}")
    for name in ("torch", "fbgemm_gpu", "torchrec", "deepspeed", "pyarrow", "wandb", "torchdata"):
        try:
            mod = importlib.import_module(name)
            print(f"{name:13s} {getattr(mod, '__version__', '?')}")
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            ok = False
            print(f"{name:13s} FAILED: {type(e).__name__}: {e}")
    import torch

    rt = detect_runtime()
    problems = install_problems(rt.device_type)  # fbgemm on the device training will use
    fbgemm = [p for p in problems if p.startswith("fbgemm")]
    print(f"fbgemm ops    {'FAILED: ' + fbgemm[0] if fbgemm else 'load and run on ' + rt.device_type}")
    for p in problems:
        if not p.startswith("fbgemm"):
            print(f"torch         {p}")
    ok = ok and not problems
    from deepspeed.accelerator import get_accelerator

    print(f"DS accel      {get_accelerator()._name} (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')})")
    print(f"device        {rt.device_type}{' (' + gpu_name() + ')' if rt.device_type == 'cuda' else ''}")
    print(f"backend       {rt.backend}")
    print("shm comm op   skipped (only DeepSpeed's inference all-reduce uses it; collectives go through torch)")

    try:
        print(f"pipeline op   {native.build()}")
    except RuntimeError as e:
        ok = False
        print(f"pipeline op   FAILED: {e}")
    print(f"threads       {torch.get_num_threads()}")
    print("status        " + ("OK" if ok else "PROBLEMS ABOVE"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
