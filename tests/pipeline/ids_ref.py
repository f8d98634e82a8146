"""The plain numpy definition of the id mapping, the reference the production paths are tested against.

map_ids(ids, V, "hash")     mix64(id) mod V for every id
map_ids(ids, V, "modulo")   ids in [0, V) kept, the others hashed into range (and reported)
map_ids(ids, V, "raw")      unchanged
"""

from __future__ import annotations

import numpy as np

from pipeline.ids import mix64


def map_ids_counted(ids: np.ndarray, vocab_size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(mapped int64 ids, bool mask of the ids that were out of range and hashed in: 'modulo' only)."""
    ids = np.asarray(ids, dtype=np.int64)
    hashed = (mix64(ids) % np.uint64(vocab_size)).astype(np.int64)
    if mode == "raw":
        return ids, np.zeros(ids.shape, dtype=bool)
    if mode == "hash":
        return hashed, np.zeros(ids.shape, dtype=bool)
    assert mode == "modulo", mode
    bad = (ids < 0) | (ids >= vocab_size)
    return np.where(bad, hashed, ids), bad


def map_ids(ids: np.ndarray, vocab_size: int, mode: str) -> np.ndarray:
    """Mapped ids only."""
    return map_ids_counted(ids, vocab_size, mode)[0]
