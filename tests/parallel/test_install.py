"""The install picks the torch / fbgemm variant by the host and verifies it (launch/install.sh,
`python -m launch.doctor --verify-install`): one line per problem, with the fix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from parallel.env import install_problems

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU host")
def test_cpu_host_verifies_cpu_and_refuses_cuda() -> None:
    assert install_problems("cpu") == []
    problems = install_problems("cuda")
    if torch.version.cuda is None:  # this CPU build on a "GPU host": the wrong wheel, named with the fix
        assert len(problems) == 1 and "is a CPU build on a GPU host" in problems[0]
        assert "--index-url https://download.pytorch.org/whl/cu" in problems[0]
    else:
        assert "sees no GPU" in problems[0]


def test_unknown_variant_is_refused_before_installing() -> None:
    env = {**os.environ, "RANKMIXER_VARIANT": "rocm"}
    out = subprocess.run(["bash", "launch/install.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "RANKMIXER_VARIANT=rocm; expected cpu or cuda" in out.stderr


def test_the_stamp_records_the_variant() -> None:
    stamp = (REPO / ".venv" / ".installed").read_text().split()
    assert stamp[1] == ("variant=cuda" if torch.cuda.is_available() else "variant=cpu")
