"""Benchmarks as programs: each `python -m bench.<name>` prints a table and writes its figures as JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_json(path: Path | None, result: dict[str, Any], default: Callable[[Any], Any] | None = None) -> None:
    """Write a benchmark's figures to `path` (parents created; `default` as in `json.dumps`); nothing when
    `path` is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=default) + "\n")
