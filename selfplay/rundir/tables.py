"""A round's tables on disk, read and written in bounded windows of rows, so a data stage's memory does not grow
with the round (score, pair, margin and select read and write through here).

A table is one parquet file or a directory of `part-*.parquet` read in part order. Readers pull only the row groups
a window overlaps; writers (`TableWriter`) append one row group per window to a hidden temp file and rename it over
the output when it is complete (selfplay/rundir/atomic.py), so a kill never leaves half a table. Row groups stay at
most ROW_GROUP_ROWS rows, which bounds what a reader decodes at once. Outputs stay ordinary parquet: pandas,
pyarrow and `datasets.load_dataset("parquet", ...)` read them as before.

Narrow columns (ids, rewards, margins, counts) of a whole round are small and may be read whole (`read_columns`);
text columns (prompt, response, chosen, rejected) are only ever read a window at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from selfplay.errors import InputError
from selfplay.rundir import atomic
from selfplay.rundir.atomic import ROW_GROUP_ROWS

PAIR_TEXT = ("prompt", "chosen", "rejected")  # a pairs table's wide columns; the rest are narrow


def table_files(path: Path) -> list[Path]:
    return sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]


def count_rows(path: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in table_files(path))


def column_names(path: Path) -> list[str]:
    return list(pq.ParquetFile(table_files(path)[0]).schema_arrow.names)


def read_columns(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """Only these (narrow) columns of the whole table."""
    frames = [pq.read_table(f, columns=list(columns)).to_pandas() for f in table_files(path)]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def read_arrow(files: Iterable[Path], columns: Sequence[str] | None = None) -> pa.Table:
    """Files' (narrow) columns as one arrow table: strings stay arrow buffers, not a Python object per row. Column
    types are promoted across files (an empty part's object column is written as type null)."""
    return pa.concat_tables([pq.read_table(f, columns=list(columns) if columns is not None else None) for f in files],
                            promote_options="default")


def key_codes(path: Path, column: str = "prompt_id") -> np.ndarray:
    """An int32 code per row for `column`'s value (equal values, equal codes), without a Python object per row."""
    codes, offset = [], 0
    for f in table_files(path):
        col = pq.read_table(f, columns=[column]).column(column).combine_chunks().dictionary_encode()
        # Dictionaries are per file: make codes global by the value, via a small per-file table of distinct values.
        codes.append((col.dictionary, np.asarray(col.indices, dtype=np.int64), offset))
        offset += len(col.dictionary)
    if len(codes) == 1:
        return codes[0][1].astype(np.int32)
    values = pa.concat_arrays([d for d, _, _ in codes]).dictionary_encode()
    global_of = np.asarray(values.indices, dtype=np.int64)
    return np.concatenate([global_of[off + idx] for _, idx, off in codes]).astype(np.int32)


class _Groups:
    """The row groups of a table's files, with where each starts, so a window finds its groups by bisection.

    At most one file is open at a time: an open pyarrow ParquetFile keeps about a row group of decoded buffers
    after a read, so holding every part open would grow with the round (measured: ~13 MB per open part)."""

    def __init__(self, path: Path):
        self.paths = table_files(path)
        self.groups, sizes = [], []
        for i, f in enumerate(self.paths):
            meta = pq.read_metadata(f)
            if i == 0:
                self.schema = meta.schema.to_arrow_schema()
            for g in range(meta.num_row_groups):
                self.groups.append((i, g))
                sizes.append(meta.row_group(g).num_rows)
        self.starts = np.r_[0, np.cumsum(sizes, dtype=np.int64)]
        self._open: tuple[int, pq.ParquetFile] | None = None

    def _file(self, i: int) -> pq.ParquetFile:
        if self._open is None or self._open[0] != i:
            self.close()
            self._open = (i, pq.ParquetFile(self.paths[i]))
        return self._open[1]

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def read(self, lo: int, hi: int, columns: Sequence[str] | None) -> pd.DataFrame:
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        pieces = []
        for k in range(max(first, 0), len(self.groups)):
            start, end = int(self.starts[k]), int(self.starts[k + 1])
            if start >= hi:
                break
            i, g = self.groups[k]
            table = self._file(i).read_row_group(g, columns=list(columns) if columns is not None else None)
            pieces.append(table.slice(max(lo - start, 0), min(hi, end) - max(lo, start)))
        if not pieces:
            empty = self.schema.empty_table()
            return (empty.select(list(columns)) if columns is not None else empty).to_pandas()
        return pa.concat_tables(pieces).to_pandas()


def read_rows(path: Path, lo: int, hi: int, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows [lo, hi) of the table, decoding only the row groups they touch."""
    groups = _Groups(path)
    try:
        return groups.read(lo, hi, columns)
    finally:
        groups.close()


def windows(n_rows: int, rows: int | None) -> list[tuple[int, int]]:
    """[lo, hi) ranges of `rows` rows covering n_rows (rows None: one window, the whole table)."""
    step = rows or max(n_rows, 1)
    return [(lo, min(lo + step, n_rows)) for lo in range(0, n_rows, step)]


def group_windows(codes: np.ndarray, rows: int | None) -> list[tuple[int, int]]:
    """Windows of about `rows` rows that never split a run of equal codes (a prompt's rows stay in one window):
    each window ends at the first code change at or after `rows` rows. The rows of a code must be contiguous."""
    n = len(codes)
    if rows is None or n <= rows:
        return [(0, n)] if n else []
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])  # first row of each run
    out, lo = [], 0
    while lo < n:
        k = np.searchsorted(starts, lo + rows)  # first run starting at or after lo + rows
        hi = int(starts[k]) if k < len(starts) else n
        out.append((lo, hi))
        lo = hi
    return out


def check_contiguous(codes: np.ndarray, path: Path, what: str = "prompt_id") -> None:
    """Refuse a table whose rows of one key are not adjacent (grouping by window would split them)."""
    runs = codes[np.r_[True, codes[1:] != codes[:-1]]] if len(codes) else codes
    if len(np.unique(runs)) != len(runs):
        raise InputError(f"{path}: the rows of one {what} are not adjacent (the stages write each prompt's rows "
                         "together); it was not written by selfplay's stages, or was edited — redo the stage that "
                         "wrote it")


class TableWriter:
    """Writes a parquet table window by window: each `write(frame)` appends row groups to a hidden temp file, which
    leaving the `with` block renames over `path` (atomic.replacing). The first frame fixes the schema (later ones
    are cast to it). Leaving by an exception removes the temp file, so the output is complete or absent."""

    def __init__(self, path: Path, empty: pd.DataFrame | None = None):
        self.path, self.empty, self.rows = path, empty, 0
        self._replacing = atomic.replacing(path)
        self._writer: pq.ParquetWriter | None = None

    def write(self, frame: pd.DataFrame) -> None:
        if frame.empty:  # an empty window would fix null column types; it stands in if nothing else comes
            self.empty = frame if self.empty is None else self.empty
            return
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, table.schema)
        elif not table.schema.equals(self._writer.schema):
            table = table.cast(self._writer.schema)
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.rows += len(frame)

    def __enter__(self) -> TableWriter:
        self._tmp = self._replacing.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and self._writer is None:  # nothing written: the empty frame, so the columns are there
            empty = self.empty if self.empty is not None else pd.DataFrame()
            self._writer = pq.ParquetWriter(self._tmp, pa.Table.from_pandas(empty, preserve_index=False).schema)
        if self._writer is not None:
            self._writer.close()
        self._replacing.__exit__(exc_type, exc, tb)


def write_frames(path: Path, frames: pd.DataFrame | Iterable[pd.DataFrame]) -> int:
    """A table from one frame or from frames as they come (a generator's windows); returns its rows."""
    with TableWriter(path) as out:
        for frame in [frames] if isinstance(frames, pd.DataFrame) else frames:
            out.write(frame)
    return out.rows


def iter_windows(path: Path, bounds: list[tuple[int, int]], columns: Sequence[str] | None = None
                 ) -> Iterator[tuple[int, int, pd.DataFrame]]:
    """(lo, hi, rows [lo, hi)) of each window, in order (the files' metadata is read once). Between windows the
    heap's freed pages go back to the system (release_freed_memory)."""
    if not bounds:
        return
    groups = _Groups(path)
    try:
        for k, (lo, hi) in enumerate(bounds):
            if k:
                release_freed_memory()
            yield lo, hi, groups.read(lo, hi, columns)
    finally:
        groups.close()


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators return memory themselves
        return None


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim). A window's work frees millions of small
    allocations (tokenised rows, Python strings, arrow buffers) between a few that live on, and glibc only returns
    the top of its heap by itself, so without this a stage's resident memory crept up window after window: by
    ~45 MB a window over the first 10 windows of 16,384 pairs of margin tokenisation, flat after 2 with it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
