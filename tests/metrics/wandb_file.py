"""Read an offline W&B run file (`run-<id>.wandb`) back: the records W&B writes there, so tests can check
what a user would see after `wandb sync`. The format is a LevelDB-style log: a 7-byte header
(":W&B", magic, version), then 32 KiB blocks of chunks (crc32, length, type: full / first / middle /
last), each record a `wandb_internal_pb2.Record`."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every Record of the file, in order."""
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path}: not a W&B run file"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (FULL, FIRST) else buf + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def history(path: Path) -> list[dict[str, Any]]:
    """The logged rows: {metric key: value} (image entries appear as their '<key>/_type' etc. fields)."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({_key(i): json.loads(i.value_json) for i in r.history.item})
    return rows


def summary(path: Path) -> dict[str, Any]:
    """The run summary after the last update."""
    out: dict[str, Any] = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "summary":
            out.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return out


def run_info(path: Path) -> Any:
    """The run record (id, group, tags, notes, job type)."""
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")
