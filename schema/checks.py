"""The checks config sections validate with; every failure is one `ConfigError` line naming the key."""

from __future__ import annotations

import math
from collections.abc import Iterable


class ConfigError(ValueError):
    """A config problem: names the key and what was expected."""


def check_one_of(value: str, allowed: Iterable[str], key: str) -> None:
    """`value` must be one of `allowed` (the implementing module's own names)."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"config key '{key}' = {value!r}; expected one of: {', '.join(allowed)}")


def check_finite(value: float, key: str) -> None:
    """`value` must be a finite number (no nan / inf)."""
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")


def check_range(
    value: float,
    key: str,
    *,
    min: float | None = None,  # noqa: A002 - reads best at the call site
    max: float | None = None,  # noqa: A002
    min_open: bool = False,
    max_open: bool = False,
) -> None:
    """`value` must be finite and within [min, max] (`min_open` / `max_open` exclude the bound)."""
    check_finite(float(value), key)
    low_ok = min is None or (value > min if min_open else value >= min)
    high_ok = max is None or (value < max if max_open else value <= max)
    if not (low_ok and high_ok):
        if max is None:
            bound = f"{'>' if min_open else '>='} {min}"
        elif min is None:
            bound = f"{'<' if max_open else '<='} {max}"
        else:
            bound = f"in {'(' if min_open else '['}{min}, {max}{')' if max_open else ']'}"
        raise ConfigError(f"{key} must be {bound}, got {value}")
