"""Features computed from other columns as a row group is read: the dense `len(<list column>)` and the
sparse `<attribute>[<sequence>]`.

    [features]
    dense = ["hist_count", "len(hist_items)"]     # the number of ids in the row's hist_items list
    sparse = [..., { name = "item_genres[hist_items]", table = "genre", ... }]   # the history's genres

A sequence pooled by mean or attention hides how long it is (both are invariant to the length), yet
the length is often the signal that carries over to new users: with `hist_count` (the user's earlier
rows) it gives the user's click rate. `len(c)` is the row's number of elements of list column `c`
(before any max_len truncation; a null list counts 0), as float32; it is a dense feature like any other
(statistics over the training rows, `dense_transform`, the model's dense input), and the same code
derives it for training, validation, evaluate, export checks and predict, since every reader of Parquet
columns goes through `physical_columns` + `add_derived` (`pipeline.reader` via `decode.decode_piece`,
`pipeline.dense_stats.read_columns`).

The file needs the source column (a list column), not the derived name; a file that happens to have a
column literally named `len(c)` still gets the derived value.

`a[s]` (a sparse feature) is the attribute `a` of every item in the sequence `s`: the ids that the
candidate-item column (`features.item_id`) carried in column `a` on the training rows (the validation
carve included), looked up in the item catalogue (`pipeline.catalog`) for each id of `s`. The decoder
computes its values from the catalogue; the file needs `s` (and `a` on the rows the catalogue reads).
`physical_columns` maps dense names, `sparse_columns` sparse ones.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_LENGTH = re.compile(r"^len\((.+)\)$")
_LOOKUP = re.compile(r"^([^\[\]]+)\[([^\[\]]+)\]$")


def length_source(name: str) -> str | None:
    """'len(hist_items)' -> 'hist_items'; None for a plain column name."""
    m = _LENGTH.match(name)
    return m.group(1) if m else None


def lookup_source(name: str) -> tuple[str, str] | None:
    """'item_genres[hist_items]' -> ('item_genres', 'hist_items') (attribute, sequence); None otherwise."""
    m = _LOOKUP.match(name)
    return (m.group(1), m.group(2)) if m else None


def physical_columns(names: list[str]) -> list[str]:
    """The file columns the dense features `names` need, each once, in order: `len(s)` reads column s."""
    out = [length_source(n) or n for n in names]
    return list(dict.fromkeys(out))


def sparse_columns(names: list[str]) -> list[str]:
    """The file columns the sparse features `names` need, each once, in order: `a[s]` reads column s."""
    out = [lk[1] if (lk := lookup_source(n)) else n for n in names]
    return list(dict.fromkeys(out))


def length_values(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Elements per row of a list column, as float32 (n,); a null list counts 0.

    Raises:
        TypeError: `arr` is not a list column.
    """
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise TypeError(f"len(): expected a list column, got {arr.type}")
    n = pc.list_value_length(arr).fill_null(0)
    return np.ascontiguousarray(n.to_numpy(zero_copy_only=False), dtype=np.float32)


def add_derived(table: pa.Table, names: list[str]) -> pa.Table:
    """`table` with every derived name of `names` as a float32 column (sources must be columns of it)."""
    for name in names:
        src = length_source(name)
        if src is None:
            continue
        col = pa.array(length_values(table.column(src)))
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, col) if i >= 0 else table.append_column(name, col)
    return table
