"""The job config: sections, cross-section rules, TOML + command-line loading, `--help`.

from config import JobConfig, load_config, ConfigError
"""

from config.job import JobConfig, validate_job
from config.load import load_config
from schema import ConfigError

__all__ = ["ConfigError", "JobConfig", "load_config", "validate_job"]
