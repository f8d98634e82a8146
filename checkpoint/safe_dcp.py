"""Reading torch.distributed.checkpoint (DCP) directories without running code from them.

DCP's `FileSystemReader.read_metadata` unpickles `.metadata` with plain `pickle.load`: a crafted file
runs arbitrary code on resume, `evaluate` and `export`. `SafeFileSystemReader` reads the same files
through an unpickler that only constructs the classes a DCP metadata file is made of (its metadata
dataclasses, torch sizes, dtypes and layouts, paths); anything else is a `CheckpointError` naming the
file and the class, and nothing of it runs. Tensors themselves are read by DCP as before (raw storage
bytes, not pickle).

    dcp.load(state, storage_reader=SafeFileSystemReader(path), ...)
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from checkpoint.format import CheckpointError

_DTYPES = {
    name
    for name in dir(torch)
    if isinstance(getattr(torch, name, None), torch.dtype)  # torch.float32, torch.int64, ...
}
ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size", *_DTYPES},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}  # fmt: skip
"""The only globals a DCP metadata file may name (checked on torch 2.13's files)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.where}: refuses to unpickle {module}.{name} (not a DCP metadata class); the file is corrupt "
            "or was tampered with"
        )


def load_metadata(path: str, data: bytes) -> Metadata:
    """Unpickle DCP metadata `data` (read from `path`) with the restricted unpickler."""
    try:
        metadata = _RestrictedUnpickler(data, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated / garbled file: one line naming it
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata (a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader with `read_metadata` through the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(str(path), f.read())
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def dcp_error(where: str, e: BaseException) -> CheckpointError:
    """One line for a DCP failure: DCP wraps every rank's exception in a CheckpointException (a
    BaseException, which `except Exception` misses); the first rank's message names what went wrong."""
    failures = getattr(e, "failures", None)
    if failures:
        inner = next(iter(failures.values()))[0]
        if isinstance(inner, CheckpointError):
            return inner
        return CheckpointError(f"{where}: {type(inner).__name__}: {str(inner).splitlines()[0] if str(inner) else ''}")
    return CheckpointError(f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
