"""Plan a dataset from Parquet footers only: which files, which row groups, how many rows.

    plan = plan_dataset("data/default/train", cfg.data, cfg.features)
    plan.files   # sorted paths of the usable files
    plan.units   # WorkUnit(file_index, row_group, start, stop), in file / row-group order
    plan.skipped # [(path, reason)] of files skipped under data.on_bad_file = "skip"

`uri` may be a directory (every file below it except hidden ones and names starting with '_', such
as _SUCCESS), a glob (`data/*/part-*.parquet`), a single file, or a URI that `pyarrow.fs` resolves
(`file://`, `s3://`, `gs://`, `hdfs://`). The plan is a pure function of the listing and the footers,
so every rank computes the same one.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import BAD_FILE_POLICIES, DataConfig, FeaturesConfig
from pipeline.derived import length_source, lookup_source, physical_columns, sparse_columns
from pipeline.errors import DataError

__all__ = ["DataError", "DatasetPlan", "WorkUnit", "carve_tail", "plan_dataset", "resolve_files", "required_columns"]

_GLOB_CHARS = "*?["
T = TypeVar("T")


@dataclass(frozen=True)
class WorkUnit:
    """Rows [start, stop) of one row group of `plan.files[file_index]`."""

    file_index: int
    row_group: int
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass
class DatasetPlan:
    """Files, work units and row count of a dataset; picklable (sent to reader processes)."""

    uri: str
    filesystem: pafs.FileSystem
    files: list[str]
    units: list[WorkUnit]
    columns: list[str]
    """Columns the readers decode (labels, dense, sparse, user id, row id), in schema order of use."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    schema: pa.Schema | None = None
    """Arrow schema of the first usable file."""

    @functools.cached_property
    def num_rows(self) -> int:
        """Rows of all units (computed once: the loader's state asks for it at every step, and a plan of
        100k files has ~400k units; `dataclasses.replace` builds a new plan, with its own count)."""
        return sum(u.num_rows for u in self.units)

    def fingerprint(self) -> tuple[int, int, int]:
        """(files, units, rows): stored in loader state to catch a resume on different data."""
        return (len(self.files), len(self.units), self.num_rows)

    def content_key(self, *settings: object) -> str:
        """A 16-hex key of the files (path, size, modification time), the row ranges and `settings` (JSON-able):
        what a cache of statistics over this plan's rows (dense statistics, id vocabularies) is valid for."""
        infos = self.filesystem.get_file_info(self.files)
        files = [(p, i.size, i.mtime_ns) for p, i in zip(self.files, infos)]
        units = [(u.file_index, u.row_group, u.start, u.stop) for u in self.units]
        return hashlib.sha256(json.dumps([files, units, *settings]).encode()).hexdigest()[:16]


def carve_tail(plan: DatasetPlan, fraction: float) -> tuple[DatasetPlan, DatasetPlan]:
    """Split a plan by row order: (the first floor(N (1 - fraction)) rows, the rest), N = plan.num_rows.

    Deterministic (file, row-group and row order; no shuffling), so the validation rows of
    `data.valid_fraction` are the same on every rank and every run, and never trained on. A row group
    on the boundary is split between the two.

    Raises:
        DataError: either side would be empty.
    """
    n = plan.num_rows
    keep = math.floor(n * (1.0 - fraction))
    if not 0 < keep < n:
        raise DataError(f"{plan.uri}: data.valid_fraction = {fraction} leaves {keep} of {n} rows for training")
    head: list[WorkUnit] = []
    tail: list[WorkUnit] = []
    seen = 0
    for u in plan.units:
        if seen + u.num_rows <= keep:
            head.append(u)
        elif seen >= keep:
            tail.append(u)
        else:
            cut = u.start + (keep - seen)
            head.append(WorkUnit(u.file_index, u.row_group, u.start, cut))
            tail.append(WorkUnit(u.file_index, u.row_group, cut, u.stop))
        seen += u.num_rows
    return (
        dataclasses.replace(plan, units=head, uri=f"{plan.uri} (rows [0, {keep}))"),
        dataclasses.replace(plan, units=tail, uri=f"{plan.uri} (rows [{keep}, {n}): data.valid_fraction {fraction})"),
    )


def _is_hidden(rel_path: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel_path.split("/") if part)


def resolve_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """List the data files `uri` names, sorted. Raises DataError when nothing matches."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
    else:
        fs, path = pafs.LocalFileSystem(), uri
        if not path.startswith("/"):
            import os

            path = os.path.abspath(path)
    if any(c in path for c in _GLOB_CHARS):
        parts = path.split("/")
        first = next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS))
        base = "/".join(parts[:first]) or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = [
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and fnmatch.fnmatchcase(i.path, path)
            and not _is_hidden(i.path[len(base) :])
        ]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{uri}: no such file or directory")
        if info.type == pafs.FileType.File:
            files = [info.path]
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File and not _is_hidden(i.path[len(path) :])]
    if not files:
        raise DataError(f"{uri}: no data files found (hidden files and names starting with '_' are ignored)")
    return fs, sorted(files)


def required_columns(data: DataConfig, features: FeaturesConfig) -> list[str]:
    """Every column the pipeline reads, each once: labels, dense, sparse, user id, item id, row id (a
    derived feature such as 'len(hist_items)' or 'item_genres[hist_items]' reads its source, `pipeline.derived`)."""
    cols = [*features.labels, *physical_columns(features.dense), *sparse_columns([sf.name for sf in features.sparse])]
    cols += [c for c in (features.user_id, features.item_id, data.row_id_column) if c]
    seen: set[str] = set()
    return [c for c in cols if not (c in seen or seen.add(c))]


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _expected(data: DataConfig, features: FeaturesConfig) -> dict[str, tuple[str, object]]:
    """column -> (description of the accepted types, predicate on pa.DataType)."""
    out: dict[str, tuple[str, object]] = {}
    num = lambda t: _is_int(t) or pa.types.is_floating(t)
    for c in features.labels:
        out[c] = ("a label (int, float or bool)", lambda t: num(t) or pa.types.is_boolean(t))
    for c in features.dense:
        src = length_source(c)
        if src is None:
            out[c] = ("a dense feature (float or int)", num)
        else:
            out[src] = (f"a list column (dense feature '{c}' counts its elements)", _is_list)
    for sf in features.sparse:
        if lookup_source(sf.name) is not None:
            continue  # derived from its sequence feature, which is checked as itself
        scalar = _is_str if sf.dtype == "string" else _is_int
        if sf.max_len > 1:
            desc = f"list<{'string' if sf.dtype == 'string' else 'int64'}> (max_len={sf.max_len})"
            out[sf.name] = (desc, lambda t, s=scalar: _is_list(t) and s(t.value_type))
        else:
            desc = f"{'string' if sf.dtype == 'string' else 'int64'} (a scalar id, max_len=1)"
            out[sf.name] = (desc, scalar)
    if features.user_id:
        out[features.user_id] = ("an integer user id", _is_int)
    if features.item_id and features.item_id not in out:
        out[features.item_id] = ("an item id (int or string)", lambda t: _is_int(t) or _is_str(t))
    if data.row_id_column:
        out[data.row_id_column] = ("an integer row id (data.row_id_column; set it to '' to disable the audit)", _is_int)
    return out


class _SchemaCache:
    """The last Parquet schema that passed the column checks: files of one dataset nearly always share
    their schema, so the Arrow conversion and the checks run once, not once per file (thread-safe:
    a stale read only means one more check)."""

    def __init__(self) -> None:
        self.passed: tuple[pq.ParquetSchema, pa.Schema] | None = None


def _check_file(
    fs: pafs.FileSystem, path: str, expected: dict[str, tuple[str, object]], cache: _SchemaCache | None = None
) -> tuple[list[WorkUnit], pa.Schema]:
    """Read one footer; return its units (file_index filled in by the caller) or raise DataError."""
    try:
        with fs.open_input_file(path) as f:
            md = pq.read_metadata(f)
    except (OSError, pa.ArrowException) as e:
        raise DataError(
            f"{path}: not a readable Parquet file (corrupt or truncated?): {str(e).splitlines()[0]}"
        ) from None
    passed = cache.passed if cache is not None else None
    if passed is not None and md.schema.equals(passed[0]):
        schema = passed[1]
    else:
        schema = md.schema.to_arrow_schema()
        for col, (desc, ok) in expected.items():
            idx = schema.get_field_index(col)
            if idx < 0:
                raise DataError(f"{path}: column '{col}' is missing; expected {desc}")
            t = schema.field(idx).type
            if not ok(t):  # type: ignore[operator]
                raise DataError(f"{path}: column '{col}' has type {t}; expected {desc}")
        if cache is not None:
            cache.passed = (md.schema, schema)
    if md.num_rows == 0 or md.num_row_groups == 0:
        raise DataError(f"{path}: file is empty (0 rows)")
    units = []
    for rg in range(md.num_row_groups):
        n = md.row_group(rg).num_rows
        if n > 0:
            units.append(WorkUnit(-1, rg, 0, n))
    return units, schema


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[str], T], items: list[str], ahead: int) -> Iterator[T]:
    """`pool.map(fn, items)` in order, with at most `ahead` calls queued or running: `Executor.map` submits
    every item at once, and a million pending futures cost more memory than the plan itself."""
    pending: deque[Future[T]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def plan_dataset(uri: str, data: DataConfig, features: FeaturesConfig) -> DatasetPlan:
    """List `uri`, read every footer, check the configured columns and build work units.

    Args:
        uri: directory, glob, file or pyarrow-fs URI.
        data: `data.on_bad_file` decides between failing ("error") and skipping ("skip").
        features: the columns to check.
    Returns:
        DatasetPlan with one WorkUnit per non-empty row group of every usable file.
    Raises:
        DataError naming the file (and column) on the first bad file when on_bad_file == "error", or
        when no usable file is left.
    """
    if data.on_bad_file not in BAD_FILE_POLICIES:
        raise DataError(f"data.on_bad_file = {data.on_bad_file!r}; expected one of {', '.join(BAD_FILE_POLICIES)}")
    fs, paths = resolve_files(uri)
    expected = _expected(data, features)
    files: list[str] = []
    units: list[WorkUnit] = []
    skipped: list[tuple[str, str]] = []
    schema = None

    cache = _SchemaCache()

    def check(path: str) -> tuple[list[WorkUnit], pa.Schema] | DataError:
        try:
            return _check_file(fs, path, expected, cache)
        except DataError as e:
            return e

    # footers read by `data.plan_threads` threads (Arrow releases the GIL on I/O); results are taken in
    # path order, so the plan and the first error reported do not depend on the threads
    auto = (os.cpu_count() or 1) if isinstance(fs, pafs.LocalFileSystem) else 32
    threads = max(1, min(data.plan_threads or auto, len(paths)))
    with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
        results = _bounded_map(pool, check, paths, 8 * threads) if pool is not None else map(check, paths)
        for path, result in zip(paths, results):
            if isinstance(result, DataError):
                if data.on_bad_file == "error":
                    if pool is not None:  # do not wait for the footers still queued
                        pool.shutdown(wait=False, cancel_futures=True)
                    raise result
                skipped.append((path, str(result)))
                continue
            file_units, file_schema = result
            fi = len(files)
            files.append(path)
            units += [WorkUnit(fi, u.row_group, u.start, u.stop) for u in file_units]
            schema = schema or file_schema
    if not files:
        reasons = "; ".join(r for _, r in skipped[:3])
        raise DataError(f"{uri}: no usable Parquet file ({len(skipped)} skipped: {reasons})")
    return DatasetPlan(uri, fs, files, units, required_columns(data, features), skipped, schema)
