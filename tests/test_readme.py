"""Every command the README shows in a ```bash block runs, in order, on a fresh copy of the tree.

The copy holds the files git tracks (and the untracked ones it does not ignore), like a fresh clone,
with the installed `.venv/` and `.build/` linked in: nothing the repository does not build itself.
Commands run with this checkout's interpreter (PATH, PYTHON): through the link its site-packages would
have another path, and DeepSpeed's op would be rebuilt for it.
Blocks fenced as ```text are illustrations that cannot run here (several hosts, hours of CPU); the
test checks that they hold only such commands. The two set-up commands (`make train`, `make test`)
are what CI and newcomers run themselves and are not re-run here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOT_RERUN = ("make train", "make test")
"""The two set-up commands: CI runs `make test` itself; `make train` is minutes of CPU."""
ILLUSTRATIONS = (
    r"^make study\b",
    r"^python -m launch\.study .*/my/",
    r"^NNODES=2 ",
    r"^\s+launch/train\.sh ",
    r"^#",
    r"^python3 -m bench\.gpu_check$",
    r"^make gpu-check$",
    r"^python -m launch\.wheelhouse (build|verify|install) ",
)
"""What ```text blocks may hold: the full study (about an hour), a study on a user's data, the 2-node x 8-GPU
launch, the device check on a GPU machine, the wheelhouse build and install (a minute and more each:
tests/launch/test_wheelhouse.py runs them)."""


def blocks(text: str, lang: str) -> list[list[str]]:
    """Commands of every fenced block of `lang`: continuation lines joined, comments and blank lines dropped."""
    out = []
    for body in re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", body)
        cmds = []
        for line in joined.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip() if not line.lstrip().startswith("#") else ""
            if line:
                cmds.append(line)
        out.append(cmds)
    return out


def fresh_copy(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for link in (".venv", ".build"):
        (dest / link).symlink_to(REPO / link)
    return dest


def test_text_blocks_hold_only_illustrations() -> None:
    for cmds in blocks((REPO / "README.md").read_text(), "text"):
        for cmd in cmds:
            assert any(re.search(p, cmd) for p in ILLUSTRATIONS), f"README ```text block runs nothing here: {cmd!r}"


def test_readme_commands_run_on_a_fresh_copy(tmp_path: Path) -> None:
    root = fresh_copy(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(
        PATH=f"{REPO / '.venv' / 'bin'}:{env['PATH']}",
        PYTHON=str(REPO / ".venv" / "bin" / "python"),
        PYTHONPATH=str(root),
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=str(REPO / ".build" / "torch_extensions"),
        WANDB_MODE="offline",
    )
    ran = 0
    for cmds in blocks((REPO / "README.md").read_text(), "bash"):
        for cmd in cmds:
            if cmd.startswith(NOT_RERUN):
                continue
            out = subprocess.run(cmd, shell=True, cwd=root, env=env, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, f"README command failed: {cmd}\n{(out.stdout + out.stderr)[-3000:]}"
            ran += 1
    assert ran >= 10, f"only {ran} README commands ran"
