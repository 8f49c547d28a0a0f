"""Sweeps (`selfplay run -m key=a,b …`): short, readable, collision-free run directory names, and a map of them.

Each job of a sweep runs in `<output_root>/<run_name>/<subdir>`, where subdir names only the swept keys with this
job's values, e.g. `selection.metric=map` or `seed=1,trainer.beta=0.05`. A value that is not a plain token (a path,
a list) is shortened to its last part plus a hash of the whole value, so two values never share a name and no name
nests or escapes. `sweep.json` at the sweep's root maps every subdir to the job's full override list; `selfplay
status <sweep root>` lists every run.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from selfplay import config
from selfplay.rundir import atomic

SWEPT_KEYS_ENV = "SELFPLAY_SWEPT_KEYS"  # set by `selfplay run -m` for its jobs (exported to SLURM jobs too)
SWEEP_MAP = "sweep.json"
_PLAIN = re.compile(r"[A-Za-z0-9_.+\-]+")


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys a command line sweeps (`key=a,b`, `key=range(…)`, `key=choice(…)`, `key=glob(…)`)."""
    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def sweep_jobs(overrides: list[str], most: int = 512) -> list[list[str]] | None:
    """Every job's override list of a basic sweep (the cartesian product of the swept values, as Hydra's basic
    sweeper makes it), for checking each config before anything starts; None when the sweep is not one this can
    expand (another sweeper's syntax, or more than `most` jobs)."""
    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
        choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
                   else [o.input_line] for o in parsed]
    except Exception:  # noqa: BLE001 — Hydra reports what it cannot parse
        return None
    if any(len(c) == 0 for c in choices) or math.prod(len(c) for c in choices) > most:
        return None
    return [list(job) for job in itertools.product(*choices)]


def _short(value: str) -> str:
    if _PLAIN.fullmatch(value) and not value.startswith("."):
        return value[:60] if len(value) <= 60 else f"{value[:40]}-{_hash(value)}"
    tail = re.sub(r"[^A-Za-z0-9_.+\-]+", "_", Path(value.rstrip("/")).name or value).strip("._")[:40]
    return f"{tail}-{_hash(value)}" if tail else _hash(value)


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:8]


def subdir_name(task_overrides: Any) -> str:
    """The run directory name of one sweep job, from its task overrides (Hydra's `hydra.overrides.task`)."""
    overrides = [str(o) for o in task_overrides]
    keys = os.environ.get(SWEPT_KEYS_ENV)
    swept = set(keys.split(",")) if keys else None
    parts = []
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        # Without the sweep's key list (a job started by other means), every override names the job, as Hydra does.
        if (key in swept) if swept is not None else key not in ("run_name", "output_root"):
            parts.append(f"{key}={_short(value)}")
    name = ",".join(parts) or "run"
    return name if len(name) <= 120 else f"{name[:100]}-{_hash(name)}"


def register() -> None:
    """The schema (selfplay.config.register) and the resolver conf/config.yaml names each sweep job's directory
    with (`${selfplay_sweep_subdir:${hydra.overrides.task}}`): what a command calls before Hydra composes."""
    config.register()
    OmegaConf.register_new_resolver("selfplay_sweep_subdir", subdir_name, replace=True)


def record_job(run_dir: Path, task_overrides: list[str]) -> None:
    """Add this job to the sweep root's sweep.json (subdir → overrides), under a lock: jobs may run at once."""
    root = run_dir.parent
    with open(root / ".sweep.lock", "a+") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        path = root / SWEEP_MAP
        runs = json.loads(path.read_text()) if path.is_file() else {}
        if runs.get(run_dir.name) != list(task_overrides):
            runs[run_dir.name] = list(task_overrides)
            atomic.write_text(path, json.dumps(dict(sorted(runs.items())), indent=1) + "\n")


def is_sweep(directory: Path) -> bool:
    return (directory / SWEEP_MAP).is_file() or (directory / "multirun.yaml").is_file()


def sweep_runs(directory: Path) -> list[Path]:
    """The run directories of a sweep: those sweep.json lists, and any other subdirectory that holds a run."""
    listed = json.loads((directory / SWEEP_MAP).read_text()) if (directory / SWEEP_MAP).is_file() else {}
    found = {p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")
             and ((p / "config.yaml").is_file() or (p / ".hydra").is_dir())}
    return [directory / name for name in sorted(set(listed) | found)]
