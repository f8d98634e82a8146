"""Device and backend are decided in one place (`parallel/env.py`): no training, metrics or launch code
names a device itself. A hard-coded CPU tensor handed to an NCCL collective is the first-step crash this
guards against ("No backend type associated with device type cpu")."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAINING_CODE = ("launch", "train", "parallel", "metrics", "checkpoint")
DECIDES = {Path("parallel/env.py")}
HARD_CODED = re.compile(r"""torch\.device\(\s*["'](cpu|cuda)|device\s*=\s*["'](cpu|cuda)|\.cuda\(\)""")


def test_no_device_named_outside_parallel_env() -> None:
    offenders = []
    for folder in TRAINING_CODE:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO)
            if rel in DECIDES:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if HARD_CODED.search(line.split("#", 1)[0]):
                    offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "take the device from parallel.env (Runtime.device) instead:\n" + "\n".join(offenders)


def test_the_lint_sees_a_hard_coded_device() -> None:
    for bad in ('t = torch.zeros(3, device="cpu")', "d = torch.device('cuda', 0)", "x = x.cuda()"):
        assert HARD_CODED.search(bad), bad
    assert not HARD_CODED.search("t = torch.zeros(3, device=self.device)")
