"""Which TorchRec / fbgemm-gpu release goes with a host's torch: the one compatibility table.

fbgemm-gpu and TorchRec release together, once per torch minor release, and a release only loads with
the torch it was built for (fbgemm-gpu-cpu 1.9.0, 1.7.0 and 1.6.0 all fail to load with torch 2.13:
the C++ ABI moves every release). The rest of the stack (DeepSpeed, pyarrow, W&B, ...) is pure Python
or torch-independent and keeps the pins of requirements.lock on every host.

Stdlib only (parallel/__init__ is empty): `launch.wheelhouse` imports it on an air-gapped host before
anything is installed.

    release_for("2.11.0+cu130")  -> Release(torch="2.11", fbgemm="1.6.0", torchrec="1.6.1", ...)
    variant_of("2.11.0+cu130", cuda=None) -> "cu130"
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
CUDA_INDEX = "https://download.pytorch.org/whl/{variant}"  # fbgemm-gpu's CUDA builds, one index per CUDA
CUDA_12_13 = ("cu126", "cu128", "cu129", "cu130")
PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")


class CompatError(ValueError):
    """No release of the stack fits the host (one line, with what does exist)."""


@dataclass(frozen=True)
class Release:
    """One row: the fbgemm-gpu / TorchRec pair built for one torch minor release.

    source: where the pairing comes from -- "verified" (loaded and trained on this project's CI
    machine), "fbgemm-table" (FBGEMM's release compatibility table), or "cadence" (the one-release-per-
    torch-minor schedule between those two; the installer's doctor check on the host is the proof).
    """

    torch: str
    fbgemm: str
    torchrec: str
    pythons: tuple[str, ...]
    cudas: tuple[str, ...]
    source: str


# Newest first. 2.13 is the pinned stack of requirements.lock (tests check the two agree).
RELEASES: tuple[Release, ...] = (
    Release("2.13", "1.8.0", "1.8.0", PYTHONS, CUDA_12_13, "verified"),
    Release("2.12", "1.7.0", "1.7.0", PYTHONS, CUDA_12_13, "cadence"),
    Release("2.11", "1.6.0", "1.6.1", PYTHONS, CUDA_12_13, "cadence"),
    Release("2.10", "1.5.0", "1.5.1", PYTHONS, CUDA_12_13, "fbgemm-table"),
    Release("2.9", "1.4.0", "1.4.0", PYTHONS, CUDA_12_13, "fbgemm-table"),
)


def torch_minor(version: str) -> str:
    """'2.11.0+cu130' -> '2.11'."""
    m = re.match(r"^(\d+)\.(\d+)", version.strip())
    if not m:
        raise CompatError(f"torch version {version!r} is not of the form MAJOR.MINOR[.PATCH][+LOCAL]")
    return f"{m.group(1)}.{m.group(2)}"


def variant_of(torch_version: str, cuda: str | None) -> str:
    """The build variant of a torch: 'cpu' or 'cuXYZ', from its local label ('+cu130') or, for a
    label-less build, from `torch.version.cuda` ('13.0' -> 'cu130'; None -> 'cpu')."""
    local = torch_version.partition("+")[2]
    if local:
        if local == "cpu" or re.fullmatch(r"cu\d{3}", local):
            return local
        raise CompatError(
            f"torch {torch_version}: build label +{local} is neither +cpu nor +cuXYZ (ROCm is not supported)"
        )
    if not cuda:
        return "cpu"
    major, _, minor = cuda.partition(".")
    return f"cu{major}{minor[:1] or '0'}"


def release_for(torch_version: str, python: str | None = None, variant: str | None = None) -> Release:
    """The release built for this torch (and, when given, this Python and variant), or a one-line error."""
    minor = torch_minor(torch_version)
    known = ", ".join(r.torch for r in RELEASES)
    rel = next((r for r in RELEASES if r.torch == minor), None)
    if rel is None:
        raise CompatError(
            f"no fbgemm-gpu/TorchRec release is known for torch {torch_version} (known: torch {known}); "
            "install one of those torch versions on the host, or add its row to parallel/compat.py"
        )
    if python is not None and python not in rel.pythons:
        raise CompatError(
            f"fbgemm-gpu {rel.fbgemm} (torch {rel.torch}) has no build for Python {python} "
            f"(builds: {', '.join(rel.pythons)})"
        )
    if variant is not None and variant != "cpu" and variant not in rel.cudas:
        raise CompatError(
            f"fbgemm-gpu {rel.fbgemm} (torch {rel.torch}) has no {variant} build (CUDA builds: {', '.join(rel.cudas)})"
        )
    return rel


def lock_stages(lock: Path = LOCK) -> dict[str, list[str]]:
    """requirements.lock as {stage: ["name==version", ...]} (its `# stage: NAME` sections)."""
    stages: dict[str, list[str]] = {}
    current = None
    for raw in lock.read_text().splitlines():
        line = raw.strip()
        if line.startswith("# stage:"):
            current = line.split(":", 1)[1].split()[0]
            stages[current] = []
        elif line and not line.startswith("#") and current is not None:
            stages[current].append(line)
    return stages


DEV_ONLY = ("pytest", "pytest-timeout", "ruff")  # the test and lint tools: not needed to train on a host


def stack_requirements(rel: Release, variant: str, lock: Path = LOCK) -> tuple[list[str], list[str]]:
    """(pinned with their dependencies resolved, pinned installed --no-deps) for a host.

    The first list is requirements.lock's deps / nobuildiso / rest stages less the dev tools; the
    second is fbgemm (fbgemm-gpu-cpu on a cpu host, fbgemm-gpu from the CUDA index otherwise) and
    TorchRec, whose declared dependency on fbgemm-gpu would pull the wrong build.
    """
    stages = lock_stages(lock)
    resolved = [r for s in ("deps", "nobuildiso", "rest") for r in stages[s] if r.split("==")[0] not in DEV_ONLY]
    fbgemm = f"fbgemm-gpu-cpu=={rel.fbgemm}" if variant == "cpu" else f"fbgemm-gpu=={rel.fbgemm}"
    return resolved, [fbgemm, f"torchrec=={rel.torchrec}"]
