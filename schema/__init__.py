"""Typed configuration machinery shared by every config section (no project imports, no torch).

A config section is a plain dataclass whose fields carry a docstring (a string literal right after
the field). This package builds such dataclasses from TOML tables, applies `--section.field value`
overrides, renders `--help` from the field docstrings, and offers the small checks every section's
`validate()` uses, all raising `ConfigError` with the config key named.

    from schema import ConfigError, build, check_one_of, check_range
"""

from schema.checks import ConfigError, check_finite, check_one_of, check_range
from schema.tree import build, field_docs, fields_of, parse_cli, parse_value

__all__ = [
    "ConfigError",
    "build",
    "check_finite",
    "check_one_of",
    "check_range",
    "field_docs",
    "fields_of",
    "parse_cli",
    "parse_value",
]
