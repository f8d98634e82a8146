"""The one error type of the input pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the data itself. The message is one line naming the file (and column / row group)
    and what was expected, e.g. ``data/train/part-3.parquet: column 'click' row group 2: label values
    must be 0 or 1, found 7``."""
