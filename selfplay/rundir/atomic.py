"""The one way a file is written: to a hidden temp file beside it (`.<name>.tmp-<pid>`), then renamed over it. A
reader sees the old file or the new one, never half of one; a kill leaves only a hidden temp file, which the
runner removes on the next start (pipeline.remove_stale_temp_files) and every reader ignores."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yields the temp path to write; renames it over `path` when the block ends, removes it if the block raises."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text)
    return path


def write_json(path: Path, obj: Any) -> None:
    """Sorted keys, indented, synced to disk before the rename (manifests are the commit point of a stage)."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())


# Row groups of at most this many rows: a reader that streams a table (selfplay/rundir/tables.py) decodes one row
# group at a time, and at ~1–2 KB of text a row this is tens of MB.
ROW_GROUP_ROWS = 16_384


def write_parquet(path: Path, frame: Any) -> Path:
    with replacing(path) as tmp:
        frame.to_parquet(tmp, index=False, row_group_size=ROW_GROUP_ROWS)
    return path
