"""One reader: the rows of a ReaderSpan, window-shuffled, as blocks of ready batches.

A reader's real rows are cut into windows of S rows (S = data.shuffle_window rounded down to a
multiple of the batch size B, at least B). Window w (rows [w*S, (w+1)*S) of the reader's stream)
is permuted (`native.permutation` of (seed, epoch, reader, w)) and cut into S / B batches, so a
batch never straddles windows and the reader's whole position is one integer (batches done): a
resumed reader recomputes the window, re-permutes it and skips the batches already consumed. The
batches of a window leave as one block (`convert.fill_block`): one buffer, one message.

Memory per reader: the decoded pieces (row groups, or their planned row ranges) one window spans plus
at most `data.prefetch_row_groups` more, read ahead and converted (`decode.decode_piece`) by one
background thread. Row groups are read one at a time (`ParquetFile.read_row_group`), never the whole
file.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipeline import native
from pipeline.config import DataConfig, FeaturesConfig
from pipeline.convert import Block, Slice, fill_block, to_window
from pipeline.decode import IdVocab, Piece, decode_piece
from pipeline.errors import DataError
from pipeline.plan import DatasetPlan, WorkUnit
from pipeline.split import ReaderSpan


def window_rows(shuffle_window: int, batch_size: int) -> int:
    """S: the shuffle window rounded down to a multiple of the batch size (at least one batch)."""
    return max(1, shuffle_window // batch_size) * batch_size


def check_labels(table: pa.Table, labels: list[str], path: str, row_group: int) -> None:
    """Raise DataError naming file, column and row group unless every label is 0 or 1 (no nulls)."""
    for name in labels:
        col = table.column(name)
        if col.null_count:
            raise DataError(
                f"{path}: column '{name}' row group {row_group}: {col.null_count} null labels; labels must be 0 or 1"
            )
        if pa.types.is_boolean(col.type):
            continue
        v = col.to_numpy()
        bad = (v != 0) & (v != 1)
        if bad.any():
            raise DataError(
                f"{path}: column '{name}' row group {row_group}: label values must be 0 or 1, "
                f"found {v[bad][0].item()!r} ({int(bad.sum())} bad rows)"
            )


class PieceReader:
    """Reads row-group slices of a plan with a small cache of open files and a read-ahead thread."""

    def __init__(
        self,
        plan: DatasetPlan,
        data: DataConfig,
        features: FeaturesConfig,
        max_open: int = 4,
        vocabs: dict[str, IdVocab] | None = None,
    ):
        self.plan, self.data, self.features, self.max_open = plan, data, features, max_open
        self.vocabs = vocabs
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None

    def _file(self, fi: int) -> pq.ParquetFile:
        pf = self._files.pop(fi, None)
        if pf is None:
            path = self.plan.files[fi]
            try:  # pre-buffering coalesces remote reads; on local disks it only costs CPU (measured: ~3%)
                local = isinstance(self.plan.filesystem, pafs.LocalFileSystem)
                pf = pq.ParquetFile(
                    self.plan.filesystem.open_input_file(path),
                    pre_buffer=not local,
                    page_checksum_verification=self.data.verify_checksums,
                )  # pages written with a CRC (pipeline.tools.synth / criteo do) are verified; others read as before
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{path}: cannot open Parquet file: {str(e).splitlines()[0]}") from None
        self._files[fi] = pf
        while len(self._files) > self.max_open:
            self._files.popitem(last=False)[1].close()
        return pf

    def read(self, piece: WorkUnit) -> Piece:
        """Decode rows [start, stop) of one row group (the columns of the plan), labels validated, into
        the arrays the compiled pass reads (`decode.decode_piece`)."""
        path = self.plan.files[piece.file_index]
        try:
            table = self._file(piece.file_index).read_row_group(
                piece.row_group, columns=self.plan.columns, use_threads=False
            )
        except (OSError, pa.ArrowException) as e:
            msg = str(e).splitlines()[0]
            column = self._failing_column(piece)
            where = f"column '{column}' " if column else ""
            raise DataError(
                f"{path}: {where}row group {piece.row_group}: cannot decode (corrupt file?): {msg}"
            ) from None
        if piece.start or piece.stop != table.num_rows:
            table = table.slice(piece.start, piece.num_rows)
        check_labels(table, self.features.labels, path, piece.row_group)
        rid = self.data.row_id_column
        if rid and table.column(rid).null_count:
            raise DataError(f"{path}: column '{rid}' row group {piece.row_group}: null row ids; row ids must be set")
        return decode_piece(table, self.data, self.features, self.vocabs)

    def _failing_column(self, piece: WorkUnit) -> str | None:
        """After a row group failed to decode: the first column that fails alone (for the error line)."""
        pf = self._file(piece.file_index)
        for column in self.plan.columns:
            try:
                pf.read_row_group(piece.row_group, columns=[column], use_threads=False)
            except (OSError, pa.ArrowException):
                return column
        return None

    def submit(self, piece: WorkUnit) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-read")
        return self._pool.submit(self.read, piece)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for pf in self._files.values():
            pf.close()
        self._files.clear()


class RowStream:
    """The concatenated rows of a list of pieces, taken in increasing ranges."""

    def __init__(self, reader: PieceReader, pieces: list[WorkUnit], prefetch: int):
        self.reader, self.pieces, self.prefetch = reader, pieces, max(1, prefetch)
        sizes = np.array([p.num_rows for p in pieces], dtype=np.int64)
        self.ends = np.cumsum(sizes)
        self.begins = self.ends - sizes
        self._pending: dict[int, Future] = {}

    def _get(self, i: int) -> Piece:
        for j in [j for j in self._pending if j < i]:  # pieces behind us (resume skipped them)
            self._pending.pop(j).cancel()
        for j in range(i, min(len(self.pieces), i + self.prefetch)):
            if j not in self._pending:
                self._pending[j] = self.reader.submit(self.pieces[j])
        return self._pending[i].result()

    def take(self, lo: int, hi: int) -> list[Slice]:
        """Rows [lo, hi) of the stream, as (piece, a, b) slices of the decoded pieces; successive calls
        must not go backwards."""
        first = int(np.searchsorted(self.ends, lo, side="right"))
        parts = []
        i = first
        while i < len(self.pieces) and self.begins[i] < hi:
            t = self._get(i)
            a = max(lo, int(self.begins[i])) - int(self.begins[i])
            b = min(hi, int(self.ends[i])) - int(self.begins[i])
            parts.append((t, a, b))
            if self.ends[i] <= hi:  # fully consumed: release it
                self._pending.pop(i, None)
            i += 1
        return parts


def private_block(nbytes: int) -> torch.Tensor:
    """A plain uint8 tensor of `nbytes` for one block (reading in the training process)."""
    return torch.empty(nbytes, dtype=torch.uint8)


def iter_reader(
    plan: DatasetPlan,
    span: ReaderSpan,
    data: DataConfig,
    features: FeaturesConfig,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    reader_id: int,
    start_batch: int = 0,
    alloc: Callable[[int], torch.Tensor] = private_block,
    vocabs: dict[str, IdVocab] | None = None,
) -> Iterator[Block]:
    """Yield batches start_batch .. span.num_batches - 1 of this reader, one block (`convert.fill_block`,
    buffers from `alloc`) per shuffle window; the first block starts at start_batch (`vocabs`: the id
    vocabularies of 'vocab' features, by table)."""
    bsz = batch_size
    win = window_rows(data.shuffle_window, bsz)
    per_win = win // bsz
    real = span.real_rows
    reader = PieceReader(plan, data, features, vocabs=vocabs)
    stream = RowStream(reader, span.pieces, data.prefetch_row_groups)
    try:
        b = start_batch
        while b < span.num_batches:
            w = b // per_win
            lo = w * win
            hi = min(lo + win, real)
            window = None
            if lo < real:
                parts = stream.take(lo, hi)
                perm = None
                if shuffle:
                    perm = native.permutation(hi - lo, (seed, epoch, reader_id, w, 0xB10C))
                window = to_window(parts, features, perm)
            last = min(span.num_batches, (w + 1) * per_win)
            yield fill_block(window, b - w * per_win, last - w * per_win, bsz, features, alloc)
            b = last
    finally:
        reader.close()
