"""The one place that decides device and backend (cuda + nccl, else cpu + gloo) and the process
environment every entry point needs. Call `setup_env()` before importing deepspeed."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TORCH_EXTENSIONS_DIR = REPO / ".build" / "torch_extensions"


def _cuda_visible() -> bool:
    """Whether a CUDA device is usable, decided without initialising CUDA in this process."""
    if os.environ.get("RANKMIXER_FORCE_CPU") == "1":
        return False
    import torch

    return torch.cuda.is_available()


STALE_BUILD_LOCK_S = 900
"""A JIT-build lock older than this is an orphan: DeepSpeed's op builds in ~40 s (5 min on a loaded machine)."""


def clear_stale_build_locks(root: Path, max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove the `lock` files that torch's JIT build (DeepSpeed's ops) left under `root` when a process was
    killed mid-build: torch waits on such a file forever, silently, in every later run. Returns the removed
    ones (each reported in one line on stderr)."""
    import time

    removed = []
    for lock in root.glob("*/lock") if root.is_dir() else []:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > max_age_s:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            print(
                f"[env] removed {lock}: a JIT build left it {age / 60:.0f} min ago (killed mid-build?)", file=sys.stderr
            )
    return removed


def pin_ninja() -> None:
    """Put this interpreter's bin folder first on PATH when it holds `ninja` (requirements.lock pins it), so
    every process JIT-builds DeepSpeed's op with the same ninja. Two ninja versions hash build commands
    differently (1.11 and 1.13 do): each one reads the other's log as "command line changed" and rebuilds
    the op (~40 s), which is what happened when a test ran with the venv first on PATH and the next without."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if (Path(bin_dir) / "ninja").exists() and path[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *(p for p in path if p != bin_dir)])


def setup_env() -> None:
    """Set DS_ACCELERATOR, the project-local TORCH_EXTENSIONS_DIR, the pinned ninja first on PATH, cuBLAS's
    deterministic workspace and quiet defaults, and clear orphaned JIT-build locks; idempotent."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS_DIR))
    pin_ninja()
    # training.deterministic on CUDA: cuBLAS is deterministic only with a fixed workspace (else torch warns
    # at every matmul); set before CUDA starts, harmless on CPU
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda_visible() else "cpu")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    clear_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))


@dataclass(frozen=True)
class Runtime:
    """Device and backend for this process."""

    device_type: str  # "cuda" | "cpu"
    backend: str  # "nccl" | "gloo"
    local_rank: int

    @property
    def device(self):  # -> torch.device
        import torch

        if self.device_type == "cuda":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def detect_runtime() -> Runtime:
    """cuda + nccl when CUDA is available, else cpu + gloo."""
    setup_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if _cuda_visible():
        return Runtime("cuda", "nccl", local_rank)
    return Runtime("cpu", "gloo", local_rank)


TORCH_CUDA_FIX = (
    "reinstall torch's CUDA build: .venv/bin/python -m pip install --force-reinstall --no-deps --isolated "
    "--index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 (a local wheel cache's CPU build "
    "also satisfies torch==2.13.0)"
)


def install_problems(variant: str) -> list[str]:
    """What is wrong with the installed stack for `variant` ('cpu' or 'cuda'), one line each with the fix:
    torch sees CUDA iff the variant is cuda (and is a CUDA build), and fbgemm's ops load and run on the
    variant's device."""
    import torch

    problems = []
    cuda_build = torch.version.cuda is not None
    if variant == "cuda" and not cuda_build:
        problems.append(f"torch {torch.__version__} is a CPU build on a GPU host: {TORCH_CUDA_FIX}")
    elif variant == "cuda" and not torch.cuda.is_available():
        problems.append(
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU although nvidia-smi does: check "
            "the driver (nvidia-smi's CUDA version must be >= torch's) and CUDA_VISIBLE_DEVICES"
        )
    elif variant == "cpu" and torch.cuda.is_available():
        problems.append(
            "torch sees a GPU but the CPU variant was installed: rerun make install (it detects the GPU with "
            "nvidia-smi) or RANKMIXER_VARIANT=cuda make install"
        )
    try:
        import fbgemm_gpu  # noqa: F401

        device = "cuda" if variant == "cuda" and torch.cuda.is_available() else "cpu"
        x = torch.tensor([1, 2, 3], dtype=torch.int64, device=device)
        torch.ops.fbgemm.asynchronous_complete_cumsum(x)
    except Exception as e:  # noqa: BLE001 - reported with the fix
        from parallel.compat import CompatError, release_for

        try:  # the release built for this torch (parallel/compat.py: one table for make install and the wheelhouse)
            fbgemm = release_for(torch.__version__).fbgemm
            name = "fbgemm-gpu" if variant == "cuda" else "fbgemm-gpu-cpu"
            fix = f"install {name}=={fbgemm} for torch {torch.__version__}"
        except CompatError as c:
            fix = str(c)
        problems.append(
            f"fbgemm ops do not run on {variant}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            f"{fix} (make install, or python -m launch.wheelhouse on an air-gapped host)"
        )
    return problems


def gpu_name() -> str:
    """Name of the first GPU as nvidia-smi reports it ('' when there is none)."""
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def quiet_third_party() -> None:
    """The one place third-party noise is silenced, so the console holds our own lines: TorchRec's
    planner advice, torch.distributed deprecations triggered inside TorchRec / DeepSpeed, DeepSpeed's
    info chatter, and torch.fx's once-per-process `is_fx_tracing` notice (TorchRec calls it) go to
    log level ERROR or are filtered. Real errors still show."""
    for name in ("torchrec", "DeepSpeed", "deepspeed", "torch.distributed", "fbgemm_gpu", "torch.fx._symbolic_trace"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torchrec.*")
    warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")


def skip_shm_comm_op() -> None:
    """Tell DeepSpeed not to build or load its CPU shared-memory comm op.

    `deepspeed.init_distributed` JIT-builds that op on a CPU host (~40-70 s, a C++ compiler, a build
    folder tied to the paths of one environment) although only `inference_all_reduce` -- DeepSpeed's
    tensor-parallel inference kernels -- ever calls it: every collective of this trainer (gradient
    all-reduce, expert all-to-all, TorchRec's) goes through torch.distributed on gloo or NCCL. The op
    is skipped by marking it incompatible in DeepSpeed's probed op table (a cached module dict meant to
    be edited) before the comm backend starts; on CUDA DeepSpeed has no such op and this changes nothing.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
