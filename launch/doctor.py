"""`python -m launch.doctor`: versions, whether fbgemm ops load, DeepSpeed's accelerator, the backend."""

from __future__ import annotations

import importlib
import os
import sys

from parallel.env import TORCH_EXTENSIONS_DIR, detect_runtime, gpu_name, setup_env
from pipeline import native


def main(argv: list[str] | None = None) -> int:
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

    try:
        import fbgemm_gpu  # noqa: F401

        x = torch.tensor([1, 2, 3], dtype=torch.int64)
        torch.ops.fbgemm.asynchronous_complete_cumsum(x)
        print("fbgemm ops    load and run")
    except Exception as e:  # noqa: BLE001
        ok = False
        print(f"fbgemm ops    FAILED: {e}")
    rt = detect_runtime()
    from deepspeed.accelerator import get_accelerator

    print(f"DS accel      {get_accelerator()._name} (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')})")
    print(f"device        {rt.device_type}{' (' + gpu_name() + ')' if rt.device_type == 'cuda' else ''}")
    print(f"backend       {rt.backend}")
    built = (TORCH_EXTENSIONS_DIR / "deepspeed_shm_comm").is_dir()
    where = f"pre-built in {TORCH_EXTENSIONS_DIR}" if built else "not built (make install builds it)"
    print(f"shm comm op   {where}")

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
