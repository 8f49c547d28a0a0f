"""Resuming a run directory made by an older selfplay: keep the run on the behaviour it began with.

Reading an older manifest is `selfplay/rundir/manifest.py`'s job (renamed keys, keys that did not exist yet). This
module handles the other half of an upgrade: an option whose default changed (or that did not exist, and whose
absence meant something other than today's default). A run begun before the change resumes with the old value,
so its finished stages are skipped and the stages still to run do what the finished ones did. The command line
wins: a key set there is never pinned (and a finished stage that ran otherwise is refused, naming the key).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from selfplay.rundir import manifest as mf
from selfplay.stages.base import stage_config_keys, stage_module

log = logging.getLogger("selfplay")


def _finished_manifests(run_dir: Path) -> Iterable[dict[str, Any]]:
    """Every stage manifest under the run directory (a compare run's arms and seeds included)."""
    for path in sorted(run_dir.rglob("round_*/*.done.json")):
        try:
            yield json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a damaged manifest is the resume's to report, with its stage


def _records(manifest: dict[str, Any], migration: mf.Migration, cfg: DictConfig) -> bool:
    """The manifest's stage ran with the migration's old value of its key."""
    if mf.config_schema(manifest) >= migration.since or not isinstance(manifest.get("config"), dict):
        return False
    try:
        keys = stage_config_keys(stage_module(manifest["stage"]), cfg)
    except (KeyError, ImportError):
        return False
    if not any(migration.key == k or migration.key.startswith(f"{k}.") for k in keys):
        return False  # this stage's result never depended on the key
    recorded = mf.migrate_config(manifest["config"], mf.config_schema(manifest), [migration])
    return recorded.get(migration.key, MISSING) == migration.before


def pin_old_behaviour(cfg: DictConfig, run_dir: Path, command_line_keys: Iterable[str],
                      migrations: Iterable[mf.Migration] | None = None) -> list[str]:
    """Set, in `cfg`, each changed option back to what this run directory's finished stages ran with, unless the
    command line sets it or the config no longer has it at today's default. Returns `key=value` of each pin."""
    given = set(command_line_keys)
    pins = []
    finished: list[dict[str, Any]] | None = None  # read once, and only when some migration could apply
    for migration in mf.MIGRATIONS if migrations is None else migrations:
        key = migration.key
        if (migration.removed or migration.before is mf.NO_VALUE or key in given
                or OmegaConf.select(cfg, key) != mf.schema_default(key)):
            continue
        if finished is None:
            finished = list(_finished_manifests(run_dir))
        if any(_records(m, migration, cfg) for m in finished):
            OmegaConf.update(cfg, key, migration.before, merge=False)
            pins.append(f"{key}={migration.before!r}")
            log.info("%s was begun under an older selfplay: keeping %s=%r (the default now is %r; set %s=… on "
                     "the command line to change it)", run_dir, key, migration.before, mf.schema_default(key), key)
    return pins


# Options whose composed value is settled on the machine at start-up: precision=auto (bf16 or fp32, by the device) and
# the default sampler.backend=vllm (hf where vLLM is not installed). Manifests record what ran. A command continuing a
# run keeps what its finished stages ran with, unless its command line sets the option, so `selfplay run` and
# `selfplay submit` (whose jobs may run on other machines) compare what runs, not what was typed. Each entry: the
# option, its unsettled value, and the options settled with it.
SETTLED_AT_START: tuple[tuple[str, Any, tuple[str, ...]], ...] = (
    ("precision", "auto", ()),
    ("sampler.backend", "vllm", ("sampler.batch_size",)),  # the hf fallback takes hf's batch size
)


def _given(key: str, command_line_keys: set[str]) -> bool:
    """The command line sets the key, or a group or node above it (`sampler=hf` sets sampler.backend)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in command_line_keys for i in range(1, len(parts) + 1))


def keep_settled_values(cfg: DictConfig, run_dir: Path, command_line_keys: Iterable[str]) -> list[str]:
    """Set, in `cfg`, each option of SETTLED_AT_START still unsettled to what this run directory's latest finished
    stage that records it ran with, unless the command line sets it. Returns `key=value` of each pin."""
    given = set(command_line_keys)
    pins: list[str] = []
    finished: list[dict[str, Any]] | None = None
    for key, unsettled, companions in SETTLED_AT_START:
        if _given(key, given) or OmegaConf.select(cfg, key) != unsettled:
            continue
        if finished is None:
            finished = sorted((m for m in _finished_manifests(run_dir) if isinstance(m.get("config"), dict)),
                              key=lambda m: m.get("timings", {}).get("finished", 0))
        recorded = [flat for flat in (mf.flatten(m["config"]) for m in finished) if key in flat]
        if not recorded or recorded[-1][key] == unsettled:
            continue
        for name in (key, *companions):
            if name in recorded[-1] and not _given(name, given):
                OmegaConf.update(cfg, name, recorded[-1][name], merge=False)
                pins.append(f"{name}={recorded[-1][name]!r}")
    if pins:
        log.info("%s: keeping %s, what its finished stages ran with (set the option on the command line to change it)",
                 run_dir, ", ".join(pins))
    return pins
