"""Loading a job: a TOML file plus `--section.field value` overrides, and `--help`.

    cfg = load_config(["--config", "configs/tiny.toml", "--training.steps", "20", "--metrics.wandb"])

Command-line forms: `--section.field value` or `=value`; a boolean alone means true (`--metrics.wandb`)
or takes true/false; lists as `a,b` or a TOML array; tables as TOML literals. `--local_rank N` (what
the `deepspeed` launcher passes) is accepted and sets LOCAL_RANK. Unknown keys, in the file or on the
command line, are errors naming the key and listing the valid ones. Nothing here imports torch, so
`--help` answers at once.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from config.job import JobConfig, validate_job
from schema import ConfigError, build
from schema.tree import parse_cli, render_help, set_dotted

HELP_INTRO = """Train RankMixer (or a baseline of the zoo) from a TOML job config plus overrides; every field
below can be set in the file's [section] table or as --section.field VALUE. Booleans: --section.flag
(true) or --section.flag false. Lists: a,b or "[a, b]". Tables: TOML literals, e.g.
--embeddings.table_sharding '{item = "row_wise"}'."""


def _split_launcher_args(argv: list[str]) -> tuple[str, bool, list[str]]:
    """(--config value, --help given, the remaining override tokens); `--local_rank` goes to LOCAL_RANK."""
    config, want_help, rest = "", False, []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, eq, value = tok.partition("=")
        if tok in ("-h", "--help"):
            want_help = True
        elif name in ("--config", "--local_rank", "--local-rank"):
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"'{name}' has no value")
                value, i = argv[i + 1], i + 1
            if name == "--config":
                config = value
            else:
                os.environ.setdefault("LOCAL_RANK", value)
        else:
            rest.append(tok)
        i += 1
    return config, want_help, rest


def load_config(
    argv: list[str] | None = None,
    world_size: int | None = None,
    prog: str = "python -m launch.train",
    pin: dict[str, Any] | None = None,
) -> JobConfig:
    """Parse `--config FILE` plus overrides into a validated JobConfig (`--help` prints every field and exits 0).

    Args:
        argv: command-line tokens (default: none).
        world_size: processes of the job, for the rules that depend on it (default: $WORLD_SIZE or 1).
        prog: program name shown by --help.
        pin: {"section.field": value} set after the file and the overrides (what a caller fixes, e.g.
            serving loads experts whole, so it pins parallelism.ep_size to 1).

    Raises:
        ConfigError: unknown key, wrong type, invalid value or combination (the message names the key).
    """
    path, want_help, rest = _split_launcher_args(list(argv or []))
    if want_help:
        sys.stdout.write(render_help(JobConfig, prog, HELP_INTRO))
        raise SystemExit(0)
    tree: dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}")
        try:
            tree = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {file}: invalid TOML: {e}") from None
    overrides = parse_cli(rest, JobConfig)
    for key, value in [*overrides, *(pin or {}).items()]:
        set_dotted(tree, key, value)
    cfg = build(JobConfig, tree)
    if cfg.data.global_batch_size > 0 and any(key == "data.batch_size" for key, _ in overrides):
        raise ConfigError(
            f"--data.batch_size is derived from data.global_batch_size ({cfg.data.global_batch_size}) here: set "
            "--data.global_batch_size instead (batch_size x world size), or --data.global_batch_size 0 to give "
            "batch_size per rank"
        )
    validate_job(cfg, int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size)
    return cfg
