"""The compiled pass of the input pipeline (`pipeline/native.c`), built once and loaded with ctypes.

    python -m pipeline.native           # build it now (make install does), print where it lives

A block of batches is written by three calls: `plan_block` (where every output row comes from and
where every (batch, feature) run of ids starts), `fill_sparse` (each row's ids in shuffled order,
straight from Arrow's buffers where possible, hashed with splitmix64 mod vocab_size bit-identically to
`pipeline.ids`, as KJT values / lengths / per-batch offsets) and `fill_rows` (dense values with
NaN/inf repaired, labels, weights, user and row ids, per-batch counters and audit checksum).
`permutation` shuffles a window. bench.pipeline measures the result.

The library is compiled with the system C compiler (`$CC`, else cc, gcc or clang: the same compiler
DeepSpeed's ops need) into `.build/native/` of the checkout (or $RANKMIXER_BUILD_DIR), named by a hash
of the source and flags so a changed source is never served by a stale build; a build is written to
a temporary name and renamed, so ranks that build at the same time never load a half-written file.
`make install` builds it; the first use builds it when missing (< 1 s).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=gnu99", "-fno-strict-aliasing"]
_lib: ctypes.CDLL | None = None


def build_dir() -> Path:
    """Where builds go: $RANKMIXER_BUILD_DIR, else .build/native of the checkout."""
    env = os.environ.get("RANKMIXER_BUILD_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".build" / "native"


def library_path() -> Path:
    """The shared library of the current source (its name carries a hash of the source and flags)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:12]
    return build_dir() / f"librm_pipeline_{digest}.so"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def build() -> Path:
    """Compile the library unless it exists; returns its path. Raises RuntimeError (one line) when
    there is no C compiler or the compile fails."""
    out = library_path()
    if out.exists():
        return out
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang) to build pipeline/native.c")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *_FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if res.returncode != 0:
            first = (res.stderr.strip().splitlines() or ["(no output)"])[0]
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {first}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> ctypes.CDLL:
    i64, u64, p = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p
    lib = ctypes.CDLL(str(build()))
    lib.rm_hash_mod.argtypes = [p, i64, u64, p]
    lib.rm_hash_mod.restype = None
    lib.rm_fill_rows.argtypes = [i64, i64, i64, p, i64, p, i64, p, i64, p, p, p, *[p] * 6, *[i64] * 5]
    lib.rm_fill_rows.restype = None
    lib.rm_permutation.argtypes = [i64, p, i64, p]
    lib.rm_permutation.restype = None
    lib.rm_plan_block.argtypes = [i64, i64, i64, p, i64, i64, p, p, p, p]
    lib.rm_plan_block.restype = i64
    lib.rm_fill_sparse.argtypes = [i64, i64, i64, i64, i64, p, p, p, p, p, p, u64, p, p, i64, p, p]
    lib.rm_fill_sparse.restype = i64
    return lib


def library() -> ctypes.CDLL:
    """The loaded library, built on first use. Raises RuntimeError (one line) when it cannot be built."""
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def address(a: np.ndarray) -> int:
    """The address of a contiguous array's first element (the array must outlive its use in C)."""
    if not a.flags.c_contiguous:
        raise ValueError("pipeline.native needs contiguous arrays")
    return a.ctypes.data


def hash_mod(ids: np.ndarray, vocab_size: int, out: np.ndarray) -> None:
    """out[:] = mix64(ids) mod vocab_size (flat contiguous int64 arrays of one size)."""
    if ids.dtype != np.int64 or out.dtype != np.int64 or ids.size != out.size:
        raise ValueError("hash_mod needs int64 ids and out of one size")
    library().rm_hash_mod(address(ids), ids.size, vocab_size, address(out))


def permutation(n: int, key: tuple[int, ...]) -> np.ndarray:
    """int64 permutation of range(n), a pure function of n and the key words (each in [0, 2**64)):
    the same on every machine and run (Fisher-Yates over a splitmix64 stream)."""
    out = np.empty(n, dtype=np.int64)
    words = np.array(key, dtype=np.uint64)
    library().rm_permutation(n, address(words), len(words), address(out))
    return out


def _check(arrays: tuple[np.ndarray, ...], dtypes: tuple[type, ...], where: str) -> list[int]:
    out = []
    for a, dt in zip(arrays, dtypes):
        if a.dtype != dt:
            raise ValueError(f"{where}: expected {np.dtype(dt)}, got {a.dtype}")
        out.append(address(a))
    return out


def plan_block(
    nb: int, bsz: int, order: np.ndarray, part_start: np.ndarray, offsets_SU: np.ndarray, max_len_S: np.ndarray
) -> tuple[np.ndarray, int]:
    """Plan a block of nb batches of bsz rows whose real rows are the window rows `order` (batch j:
    order[j * bsz : (j + 1) * bsz], fewer in the last ones): where each row comes from and where each
    (batch, feature) run of ids starts (`rm_plan_block`). Returns (plan for `fill_sparse` and
    `fill_rows`, the block's id count). Arguments as in `fill_sparse`."""
    s_total, n_parts = offsets_SU.shape
    p = _check((order, part_start, offsets_SU, max_len_S), (np.int64, np.int64, np.uint64, np.int64), "plan_block")
    if len(part_start) != n_parts + 1 or len(order) > nb * bsz:
        raise ValueError(f"plan_block: {len(order)} rows from {len(part_start) - 1} slices do not fit {nb} x {bsz}")
    plan = np.empty(2 * len(order) + nb * s_total + 1, dtype=np.int64)
    total = library().rm_plan_block(nb, bsz, len(order), p[0], s_total, n_parts, p[1], p[2], p[3], address(plan))
    return plan, total


def fill_sparse(
    nb: int,
    bsz: int,
    n_real: int,
    plan: np.ndarray,
    part_start: np.ndarray,
    ids_SU: np.ndarray,
    offsets_SU: np.ndarray,
    max_len_S: np.ndarray,
    vocab_S: np.ndarray,
    memo_S: np.ndarray,
    memo_n: int,
    values: np.ndarray,
    lengths_JSB: np.ndarray,
    voff: np.ndarray,
) -> int:
    """Write the sparse part of a block planned by `plan_block` (`rm_fill_sparse` in native.c).

    Args:
        n_real: real rows of the block (the length of the planned `order`).
        part_start: int64 P + 1, where each of the window's P slices starts (window rows).
        ids_SU: uint64 S x P, the address of feature s's int64 ids in slice p.
        offsets_SU: uint64 S x P, all 0 for a feature with one id per row, else the addresses of its
            int64 row offsets into the ids (rows + 1 values per slice).
        max_len_S: int64 S, ids kept per row (the last ones).
        vocab_S: uint64 S, 0 to copy a feature's ids, else the vocab size to hash them into.
        memo_S: uint64 S, address of the feature's memo table (`pipeline.ids`: the mapped ids of
            [0, memo_n)), or 0. Every address must stay valid for the call.
        values: int64 output, the block's ids; lengths_JSB int32 nb x S x bsz; voff int64 nb + 1.
    Returns:
        The number of ids written.
    """
    s_total, n_parts = ids_SU.shape
    if lengths_JSB.shape != (nb, s_total, bsz) or voff.shape != (nb + 1,) or len(part_start) != n_parts + 1:
        raise ValueError(f"fill_sparse: lengths {lengths_JSB.shape} / voff {voff.shape} do not fit {nb} x {bsz}")
    if len(plan) != 2 * n_real + nb * s_total + 1:
        raise ValueError("fill_sparse: the plan is not of this block")
    dtypes = (np.int64, np.uint64, np.uint64, np.int64, np.uint64, np.uint64, np.int64, np.int64, np.int32, np.int64)
    arrays = (part_start, ids_SU, offsets_SU, max_len_S, vocab_S, memo_S, plan, values, lengths_JSB, voff)
    p = _check(arrays, dtypes, "fill_sparse")
    written = library().rm_fill_sparse(
        nb, bsz, n_real, s_total, n_parts, *p[:6], memo_n, p[6], p[7], values.size, p[8], p[9]
    )
    if written < 0:
        raise ValueError(f"fill_sparse: the block's ids do not fit in {values.size} values")
    return written


def fill_rows(
    nb: int,
    bsz: int,
    n_real: int,
    plan: np.ndarray,
    part_start: np.ndarray,
    dense_FU: np.ndarray,
    labels_KU: np.ndarray,
    user_U: np.ndarray,
    row_U: np.ndarray,
    out: dict[str, np.ndarray],
    stats_columns: tuple[int, int, int, int],
) -> None:
    """Write the per-row arrays of a block planned by `plan_block` (`rm_fill_rows` in native.c).

    Args:
        n_real, plan, part_start: as in `fill_sparse`.
        dense_FU, labels_KU: uint64 F x P / K x P, addresses of float32 columns per slice.
        user_U, row_U: uint64 P, addresses of int64 id columns per slice, 0 for none.
        out: the block's arrays ("dense" nb x bsz x F, "labels" nb x bsz x K, "weights", "user", "row"
            nb x bsz, "stats" nb x C), written in full.
        stats_columns: the stats columns of non-finite dense repairs, padded rows, real rows and the
            audit checksum; the other columns are set to 0.
    """
    n_parts = len(part_start) - 1
    checks = (
        (plan, np.int64), (part_start, np.int64), (dense_FU, np.uint64), (labels_KU, np.uint64), (user_U, np.uint64),
        (row_U, np.uint64), (out["dense"], np.float32), (out["labels"], np.float32), (out["weights"], np.float32),
        (out["user"], np.int64), (out["row"], np.int64), (out["stats"], np.int64),
    )  # fmt: skip
    p = _check(tuple(a for a, _ in checks), tuple(d for _, d in checks), "fill_rows")
    if out["weights"].shape != (nb, bsz) or dense_FU.shape[1:] != (n_parts,) or labels_KU.shape[1:] != (n_parts,):
        raise ValueError(f"fill_rows: arrays do not fit {nb} x {bsz} rows from {n_parts} slices")
    if len(plan) < 2 * n_real:
        raise ValueError("fill_rows: the plan is not of this block")
    library().rm_fill_rows(
        nb, bsz, n_real, p[0], n_parts, p[1], len(dense_FU), p[2], len(labels_KU), p[3], p[4], p[5], *p[6:],
        out["stats"].shape[1], *stats_columns,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.native", description="Build the pipeline's compiled pass.")
    p.parse_args(argv)
    try:
        print(build())
    except RuntimeError as e:
        sys.exit(f"pipeline.native: {e}")


if __name__ == "__main__":
    main()
