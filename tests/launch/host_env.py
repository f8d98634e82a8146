"""A stand-in for an air-gapped GPU host's environment: a fresh venv whose only packages are an
admin-provided torch (with what torch needs, and numpy), nothing of the stack.

The torch is this project's own, seen through a meta-path finder that lets exactly those top-level
modules and distributions through from .venv's site-packages at their real paths (a copy of torch
at another path would make DeepSpeed's pre-built comm op look stale and rebuild it). Everything the
wheelhouse installs lands in the fresh venv's own site-packages, which comes first on sys.path, and
nothing else of .venv is importable: a wheel the wheelhouse forgot fails the import.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

FINDER = '''"""Lets the host's torch (and what it needs) through from {src} (tests/launch/host_env.py)."""
import importlib.machinery
import importlib.metadata as md
import re
import sys

SRC = {src!r}
MODULES = {modules!r}
DISTS = {dists!r}


class HostTorch:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if path is None and fullname in MODULES:
            return importlib.machinery.PathFinder.find_spec(fullname, [SRC])
        return None

    @classmethod
    def find_distributions(cls, context=md.DistributionFinder.Context()):
        inner = md.DistributionFinder.Context(name=context.name, path=[SRC])
        for d in md.MetadataPathFinder.find_distributions(inner):
            if re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() in DISTS:
                yield d


sys.meta_path.append(HostTorch)
'''


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_closure() -> list[str]:
    """torch and the distributions it requires (not its extras), plus numpy: what a host with torch has."""
    seen: list[str] = []
    todo = ["torch", "numpy"]
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        seen.append(name)
        for spec in md.distribution(name).requires or []:
            if "extra ==" not in spec:
                todo.append(re.split(r"[ ;<>=!~\[(]", spec, maxsplit=1)[0])
    return seen


def top_level(dist: str) -> set[str]:
    """The top-level import names a distribution installs."""
    names = set()
    for f in md.distribution(dist).files or []:
        first = f.parts[0]
        if first.endswith((".dist-info", ".pth")) or first in ("..", "__pycache__") or first.startswith("_distutils"):
            continue
        names.add(first[:-3] if first.endswith(".py") else first)
    return {n for n in names if n.isidentifier()}


def make_host(path: Path) -> Path:
    """Create the host venv at `path`; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True)
    python = path / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    dists = torch_closure()
    modules = sorted(set().union(*(top_level(d) for d in dists)))
    src = sysconfig.get_paths()["purelib"]
    (Path(site) / "_host_torch.py").write_text(FINDER.format(src=src, modules=modules, dists=sorted(dists)))
    (Path(site) / "_host_torch.pth").write_text("import _host_torch\n")
    return python
