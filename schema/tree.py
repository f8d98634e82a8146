"""Dataclass trees from TOML tables and command-line overrides, and `--help` text from field docstrings.

    tree = tomllib.loads(text)                         # {"training": {"lr": 0.01}, ...}
    for key, value in parse_cli(["--training.lr", "0.02", "--metrics.wandb"], JobConfig):
        set_dotted(tree, key, value)
    cfg = build(JobConfig, tree)                      # unknown keys and wrong types: ConfigError

Command-line forms (`parse_cli`): `--section.field value` or `--section.field=value`; a boolean field
alone (`--metrics.wandb`) means true, or takes true/false/1/0/yes/no/on/off; a list is `a,b,c` or a
TOML array `[a, b]`; tables and lists of tables are TOML literals (`{item = "row_wise"}`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import tomllib
import types
import typing
from typing import Any

from schema.checks import ConfigError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown(where: str, names: list[str]) -> ConfigError:
    return ConfigError(f"unknown config key '{where}'; valid keys here: {', '.join(names)}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert one TOML value to the annotated type; ConfigError names `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a table, got {value!r}")
        return build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a table, got {value!r}")
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if origin in (types.UnionType, typing.Union):
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass `cls` from a TOML table; unknown keys and wrong types raise ConfigError."""
    hints, names = _hints(cls), _names(cls)
    kwargs = {}
    for k, v in values.items():
        where = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise _unknown(where, names)
        kwargs[k] = _coerce(v, hints[k], where)
    return cls(**kwargs)


def resolve(root: type, dotted: str) -> Any:
    """The annotated type of `section.field` under the dataclass `root` (ConfigError if unknown)."""
    cls: Any = root
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"config key '{'.'.join(parts[:i])}' is not a section")
        if part not in _names(cls):
            raise _unknown(".".join(parts[: i + 1]), _names(cls))
        cls = _hints(cls)[part]
    return cls


def parse_value(raw: str, tp: Any, key: str) -> Any:
    """A command-line string as the TOML value of a field of type `tp` (then checked by `build`)."""
    origin = typing.get_origin(tp)
    if tp is str:
        return raw
    if tp is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(f"config key '{key}': expected true/false, got {raw!r}")
    if tp in (int, float):
        try:
            return tp(raw) if tp is float or raw.lstrip("-").isdigit() else int(raw)
        except ValueError:
            kind = "an integer" if tp is int else "a number"
            raise ConfigError(f"config key '{key}': expected {kind}, got {raw!r}") from None
    if origin is list and not raw.lstrip().startswith("["):
        (item_tp,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item_tp):
            raise ConfigError(f"config key '{key}': expected a TOML array of tables, got {raw!r}")
        return [parse_value(p.strip(), item_tp, f"{key}[{i}]") for i, p in enumerate(raw.split(",")) if p.strip()]
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config key '{key}': {raw!r} is not a TOML value ({e})") from None


def parse_cli(tokens: list[str], root: type) -> list[tuple[str, Any]]:
    """`--section.field value` tokens -> [(dotted key, TOML value)] checked against `root`'s fields."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"unexpected argument '{tok}'; overrides look like --section.field value")
        key, eq, raw = tok[2:].partition("=")
        tp = resolve(root, key)
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key '{key}' is a section; set its fields, e.g. --{key}.<field> value")
        i += 1
        if not eq:
            nxt = tokens[i] if i < len(tokens) else None
            if tp is bool and (nxt is None or nxt.lower() not in _TRUE + _FALSE):
                out.append((key, True))  # a bare flag
                continue
            if nxt is None:
                raise ConfigError(f"override '--{key}' has no value")
            raw, i = nxt, i + 1
        out.append((key, parse_value(raw, tp, key)))
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """tree[a][b]... = value for 'a.b...' (intermediate tables created)."""
    *path, last = dotted.split(".")
    node = tree
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} of a dataclass whose fields are each followed by a string literal."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "table"
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return "list of tables (TOML)" if dataclasses.is_dataclass(item) else f"list[{_type_name(item)}]"
    if origin is dict:
        return "table (TOML)"
    return getattr(tp, "__name__", str(tp))


def fields_of(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, docstring) of every leaf field under dataclass `cls`, in order."""
    out: list[tuple[str, str, Any, str]] = []
    hints, docs = _hints(cls), field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += fields_of(tp, key + ".")
        else:
            out.append((key, _type_name(tp), getattr(defaults, f.name), docs.get(f.name, "")))
    return out


def render_help(root: type, prog: str, intro: str, width: int = 100) -> str:
    """`--help` text: `intro`, then every field of `root` as `--section.field TYPE (default ...)` + docstring."""
    lines = [f"usage: {prog} [--config FILE] [--section.field VALUE ...]", "", intro.strip(), ""]
    section = None
    for key, tname, default, doc in fields_of(root):
        head = key.split(".")[0]
        if head != section:
            section = head
            sec_doc = inspect.cleandoc(_hints(root)[head].__doc__ or "").split("\n")[0]
            lines += ["", f"[{head}]  {sec_doc}"]
        shown = "true" if default is True else "false" if default is False else repr(default)
        lines.append(f"  --{key} {tname.upper() if tname in ('int', 'float', 'str') else tname}  (default {shown})")
        for para in doc.split("\n\n"):
            lines += textwrap.wrap(" ".join(para.split()), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"
