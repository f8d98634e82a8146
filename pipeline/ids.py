"""Stable id hashing and mapping into embedding-table range.

Every function here is a pure numpy function of its inputs: the same ids give the same outputs in
every process, run and machine (no Python `hash()`, no per-process salt).

    mix64(x)                 splitmix64 finaliser, a bijection on 64-bit words
    map_ids_into(ids, V, mode, out)   'hash' | 'modulo' | 'raw' -> int64 ids in [0, V) (raw: unchanged),
                             written into a caller's buffer ('hash': mix64(id) mod V for every id;
                             'modulo': ids in range kept, the others hashed into range)
    hash_strings(array)      pyarrow string array -> int64 (FNV-1a 64 of the UTF-8 bytes, then mix64)
    sum_by_id(ids, values)   sorted distinct ids and the sum of their values (occurrence counts by default)
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ID_MAPPINGS

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_CHUNK = 32768  # elements per pass: temporaries stay in cache (numpy temporaries would cost ~3x)


def _mix64_inplace(flat: np.ndarray) -> None:
    """splitmix64 of a flat uint64 array, in place, in cache-sized chunks (one small temporary)."""
    tmp = np.empty(min(_CHUNK, flat.size), dtype=np.uint64)
    for s in range(0, flat.size, _CHUNK):
        c = flat[s : s + _CHUNK]
        t = tmp[: c.size]
        np.add(c, _GOLDEN, out=c)
        np.right_shift(c, _S30, out=t)
        np.bitwise_xor(c, t, out=c)
        np.multiply(c, _M1, out=c)
        np.right_shift(c, _S27, out=t)
        np.bitwise_xor(c, t, out=c)
        np.multiply(c, _M2, out=c)
        np.right_shift(c, _S31, out=t)
        np.bitwise_xor(c, t, out=c)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of each 64-bit word: ``z = x + golden; z ^= z >> 30; z *= M1; z ^= z >> 27; z *= M2;
    z ^= z >> 31``. Accepts any int64/uint64 array; returns a new uint64 array of the same shape
    (wrapping arithmetic is intended)."""
    z = np.asarray(x).astype(np.uint64, copy=True)
    _mix64_inplace(z.reshape(-1))
    return z


def _mod(h: np.ndarray, vocab_size: int) -> np.ndarray:
    """h mod vocab_size (uint64 -> int64), as h - (h // v) * v: numpy divides by a scalar much faster
    than it takes a remainder."""
    v = np.uint64(vocab_size)
    flat = np.asarray(h).reshape(-1)  # 0-d inputs too: arithmetic on them returns scalars, not arrays
    q = flat // v
    q *= v
    np.subtract(flat, q, out=q)
    return q.view(np.int64).reshape(np.shape(h))


MEMO_IDS = 1 << 20
"""Raw ids in [0, MEMO_IDS) are mapped through a lazily built table per vocab_size (8 MiB each, per
process, shared with forked readers): one cached read instead of the arithmetic, identical results.
The compiled pass (`pipeline.native`) reads the same tables."""
_MEMO_MIN_BATCH = 4096
_memo: dict[int, np.ndarray] = {}


def _memo_table(vocab_size: int) -> np.ndarray:
    table = _memo.get(vocab_size)
    if table is None:
        table = _memo[vocab_size] = _mod(mix64(np.arange(MEMO_IDS, dtype=np.int64)), vocab_size)
    return table


def memo_for(vocab_size: int, n_ids: int) -> np.ndarray | None:
    """The memo table of vocab_size (int64 MEMO_IDS: mapped values of the raw ids [0, MEMO_IDS)) when it
    exists or `n_ids` ids are about to be hashed (enough to pay for building it), else None."""
    if vocab_size in _memo or n_ids >= _MEMO_MIN_BATCH:
        return _memo_table(vocab_size)
    return None


def warm_memo(vocab_sizes: list[int]) -> None:
    """Build the memo tables of these vocab sizes now: a trainer does this before forking reader
    processes, which then share the tables instead of each building its own every epoch."""
    for v in vocab_sizes:
        _memo_table(v)


def _small(ids: np.ndarray, vocab_size: int) -> bool:
    """True when the memo table applies: all ids in [0, MEMO_IDS), and enough of them to pay for
    building the table unless it exists. One pass: the OR of all ids is below MEMO_IDS iff every id is
    in range (negatives set bit 63)."""
    if ids.size < _MEMO_MIN_BATCH and vocab_size not in _memo:
        return False
    return ids.size > 0 and int(np.bitwise_or.reduce(ids.view(np.uint64), axis=None)) < MEMO_IDS


def _hash_mod(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """mix64(ids) mod vocab_size as int64, through the memo table when every id is small."""
    if _small(ids, vocab_size):
        return _memo_table(vocab_size)[ids]
    return _mod(mix64(ids), vocab_size)


def map_ids_into(ids: np.ndarray, vocab_size: int, mode: str, out: np.ndarray) -> np.ndarray | None:
    """Map raw int64 ids into [0, vocab_size), written into `out` (a contiguous int64 array of ids' size).

    `pipeline.decode` maps 'modulo' ids of a row group this way; 'hash' ids are left raw there and
    hashed by the compiled pass (`pipeline.native`), which computes the same values.

    Returns:
        The boolean mask of ids hashed into range ('modulo' mode), or None when there were none.
    """
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if mode == "hash":
        out[...] = _hash_mod(ids, vocab_size)
        return None
    if mode == "raw":
        out[...] = ids
        return None
    if mode == "modulo":
        out[...] = ids
        bad = (ids < 0) | (ids >= vocab_size)
        if not bad.any():
            return None
        out[bad] = _mod(mix64(ids[bad]), vocab_size)
        return bad
    raise ValueError(f"unknown id_mapping {mode!r}; expected one of {', '.join(ID_MAPPINGS)}")


def _fnv1a_unique(strings: pa.Array) -> np.ndarray:
    """FNV-1a 64 over the UTF-8 bytes of each (non-null) string, vectorised over strings: one numpy
    pass per byte position, so cost is rows x max length (short ids: a handful of passes)."""
    arr = strings.cast(pa.large_binary()) if not pa.types.is_large_binary(strings.type) else strings
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data_buf = arr.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max(initial=0))):
            live = np.nonzero(lengths > j)[0]
            h[live] = (h[live] ^ data[starts[live] + j].astype(np.uint64)) * _FNV_PRIME
    return h


def hash_strings(array: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Stable int64 ids for a string column.

    Args:
        array: pyarrow string / large_string / binary array of N values (nulls allowed).
    Returns:
        (ids_N int64, valid_N bool): ids of null entries are 0 and marked invalid.
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    enc = pc.dictionary_encode(array)
    uniq = _fnv1a_unique(enc.dictionary)
    hashed = mix64(uniq).view(np.int64)
    idx = enc.indices
    valid = np.asarray(idx.is_valid())
    codes = idx.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    ids = hashed[codes] if len(hashed) else np.zeros(len(codes), dtype=np.int64)
    ids[~valid] = 0
    return ids, valid


def sum_by_id(ids_N: np.ndarray, values_N: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct int64 ids U, per-id sums U [x V]) of `values_N` (N or N x V, any dtype), or the
    occurrence count of each id (int64) when `values_N` is None. What id vocabularies and the item
    baselines count with."""
    ids_N = np.asarray(ids_N, dtype=np.int64)
    if values_N is None:
        u, c = np.unique(ids_N, return_counts=True)
        return u, c.astype(np.int64)
    u, inv = np.unique(ids_N, return_inverse=True)
    sums = np.zeros((len(u), *values_N.shape[1:]), dtype=values_N.dtype)
    np.add.at(sums, inv, values_N)
    return u, sums


def oov_dropout(
    values: np.ndarray, lengths_SB: np.ndarray, drops: list[tuple[int, float, int]], salt: int
) -> np.ndarray:
    """Send ids of a training batch to their OOV rows with a probability per feature, so the OOV rows learn
    what an id never seen in training looks like (the test period's new users and items) and no id row is
    relied upon alone (`features.sparse[i].oov_dropout`).

    Args:
        values: the batch's KJT values (table rows of every feature, key-major).
        lengths_SB: its KJT lengths as S x B (key-major).
        drops: (key index s, probability p, oov_buckets) per 'vocab' feature with oov_dropout > 0.
        salt: a 64-bit value of (seed, epoch, rank, batch index): the same batch gets the same drops on
            every run and after a resume, with no random state to checkpoint.

    Returns:
        A copy of values with every dropped row replaced by an OOV row (mix64(row) mod oov_buckets).
    """
    out = values.copy()
    ends = np.cumsum(lengths_SB.sum(1))
    for s, p, oov in drops:
        a, b = (int(ends[s - 1]) if s else 0), int(ends[s])
        if a == b:
            continue
        keyed = np.arange(a, b, dtype=np.uint64) ^ np.uint64((salt + 0x9E3779B97F4A7C15 * (s + 1)) % 2**64)
        u = mix64(keyed) >> np.uint64(11)  # 53 random bits
        hit = u < np.uint64(int(p * 2**53))
        if hit.any():
            seg = out[a:b]
            seg[hit] = 0 if oov == 1 else _mod(mix64(seg[hit]), oov)
    return out
