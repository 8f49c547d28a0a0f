"""One run, one writer: a lock on the run directory, held by the process that writes it.

`selfplay run`, `stage` and `submit` take `<run>/.lock` exclusively; the shard processes of one sharded stage
(`stage generate shard=i num_shards=n`, SLURM array tasks) take it shared, since they write disjoint parts. The lock
is a POSIX record lock (fcntl.lockf, which NFS also honours): the kernel drops it when its process ends, however it
ends, so a killed holder never blocks the next run. Each holder leaves a small note beside it
(`.lock.holders/<host>-<pid>.json`: host, pid, command, since) that a refused process prints.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from selfplay.errors import SelfplayError
from selfplay.rundir import atomic

LOCK_NAME = ".lock"
HOLDERS = ".lock.holders"
_held: dict[Path, int] = {}  # run dir → fd, for this process's lifetime


class RunLocked(SelfplayError):
    """Another live process is writing this run directory."""


def _note_path(run_dir: Path) -> Path:
    return run_dir / HOLDERS / f"{socket.gethostname()}-{os.getpid()}.json"


def holders(run_dir: Path) -> list[dict]:
    """The notes of the processes that hold the lock: a note from this host whose pid is gone (a killed holder) is
    left out; notes from other hosts cannot be checked and are kept."""
    notes = []
    for path in sorted((run_dir / HOLDERS).glob("*.json")):
        try:
            note = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if note.get("host") == socket.gethostname() and not _alive(int(note.get("pid", -1))):
            continue  # a killed holder's note: its lock went with it
        notes.append(note)
    return notes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def acquire(run_dir: Path, shared: bool = False, command: str | None = None) -> None:
    """Hold the run directory's lock until this process ends (idempotent per directory), or raise RunLocked naming
    the holder. Creates the run directory (and nothing else in it but the lock and its note)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        found = holders(run_dir)
        who = "; ".join(f"pid {n['pid']} on {n['host']} since {n['since']} (`{n['command']}`)" for n in found[:3])
        raise RunLocked(f"{run_dir} is being written by another selfplay process: {who or 'holder unknown'}. "
                        "Wait for it to finish (or stop it); a killed process's lock goes with it, so re-running "
                        "then resumes") from None
    _held[run_dir] = fd
    atexit.register(release, run_dir)
    if not shared:  # no one else holds it: notes left by killed holders are stale
        for stale in (run_dir / HOLDERS).glob("*.json"):
            stale.unlink(missing_ok=True)
    note = _note_path(run_dir)
    note.parent.mkdir(exist_ok=True)
    atomic.write_text(note, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                        "command": command or " ".join(["selfplay", *sys.argv[1:]])[:300]}))


def release(run_dir: Path) -> None:
    """Give the lock back before the process ends (the kernel does it at exit anyway)."""
    run_dir = Path(run_dir).resolve()
    fd = _held.pop(run_dir, None)
    if fd is None:
        return
    _note_path(run_dir).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # only when no other holder's note is in it; the lock file itself stays
        (run_dir / HOLDERS).rmdir()
    os.close(fd)
