"""Sharded stages: generate, score and margin split their work across processes (SLURM array tasks).

    selfplay stage generate round=0 shard=3 num_shards=8     compute shard 3 of 8 → round_00/shards/generate/
    selfplay stage generate round=0                          merge the 8 parts into round_00/generations/

Each of these stages has a fixed *schedule* of work units that does not depend on the shard count: generate's
windows of `sampler.sort_window_batches` × `batch_size` prompts in file order (length-sorted inside by the hf
sampler), score's and margin's batches (length-sorted where the backend sorts). Shard i of n takes a contiguous
range of those units (`shard_span`), so every unit is computed exactly as the single-process run computes it and
the merged result is the same, bit for bit.

A shard writes `part-0000i-of-0000n.parquet` (the values it computed, keyed by row) through a temp file and a
rename, then its manifest `part-0000i-of-0000n.done.json` (config, inputs, checksum, stats). The stage's plain
invocation merges once every part of one shard count is present; parts still missing are computed in-process
first, so `selfplay run` also finishes a partly failed array. Nothing here is shared between concurrent shards
but the directory.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from selfplay.errors import SelfplayError
from selfplay.rundir import atomic, tables
from selfplay.rundir import manifest as mf
from selfplay.rundir.layout import round_index

SHARDED_STAGES = ("generate", "score", "margin")
_PART = re.compile(r"part-(\d{5})-of-(\d{5})\.done\.json")


def shard_span(n_items: int, unit: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Items [lo, hi) of shard `shard` of `num_shards`: a contiguous, balanced range of whole `unit`-item units.

    Every boundary is a multiple of `unit`, so a shard's batches are exactly the single-process run's batches.
    """
    n_units = -(-n_items // unit)
    first, last = shard * n_units // num_shards, (shard + 1) * n_units // num_shards
    return min(first * unit, n_items), min(last * unit, n_items)


def shard_dir(round_dir: Path, stage: str) -> Path:
    return round_dir / "shards" / stage


def part_name(shard: int, num_shards: int) -> str:
    return f"part-{shard:05d}-of-{num_shards:05d}"


def read_shard_manifests(round_dir: Path, stage: str) -> dict[int, dict[int, dict[str, Any]]]:
    """{num_shards: {shard: manifest}} of every shard manifest on disk whose part file is still intact."""
    found: dict[int, dict[int, dict[str, Any]]] = {}
    sdir = shard_dir(round_dir, stage)
    for path in sorted(sdir.glob("part-*-of-*.done.json")) if sdir.is_dir() else []:
        match = _PART.fullmatch(path.name)
        if not match:
            continue
        manifest = mf.read_json(path)
        if manifest is None or not mf.outputs_present(sdir, manifest):
            continue
        found.setdefault(int(match.group(2)), {})[int(match.group(1))] = manifest
    return found


def matching_shards(round_dir: Path, stage: str, config: dict, inputs: dict) -> dict[int, dict[int, dict[str, Any]]]:
    """The shard manifests computed with this config from these inputs (others are stale and ignored)."""
    fingerprint = mf.fingerprint(config)
    return {n: kept for n, parts in read_shard_manifests(round_dir, stage).items()
            if (kept := {i: m for i, m in parts.items()
                         if m["config_hash"] == fingerprint and m["inputs"] == dict(inputs)})}


def check_shard_count(round_dir: Path, stage: str, num_shards: int, config: dict, inputs: dict) -> None:
    """Refuse to mix shard counts: parts of another count from this same config would never be merged."""
    other = sorted(n for n in matching_shards(round_dir, stage, config, inputs) if n != num_shards)
    if other:
        raise SelfplayError(
            f"{round_dir.name}/{stage} already has shards of num_shards={other[0]} in "
            f"{shard_dir(round_dir, stage)}; use num_shards={other[0]} to continue them, or delete that directory"
        )


def write_part(round_dir: Path, stage: str, shard: int, num_shards: int,
               part: pd.DataFrame | Iterable[pd.DataFrame], config: dict, inputs: dict, stats: dict[str, Any],
               started: float) -> dict[str, Any]:
    """Publish one computed shard: part file first (temp + rename; `part` may be frames as a stage computes them,
    written as they come), manifest last, once the computation — and with it `stats` — is complete."""
    sdir = shard_dir(round_dir, stage)
    sdir.mkdir(parents=True, exist_ok=True)
    name = part_name(shard, num_shards)
    rows = tables.write_frames(sdir / f"{name}.parquet", part)
    manifest = mf.build_manifest(stage, round_index(round_dir.name), config, inputs,
                                 mf.checksum_outputs(sdir, [f"{name}.parquet"]), stats, started)
    manifest.update(shard=shard, num_shards=num_shards, rows=rows)
    atomic.write_json(sdir / f"{name}.done.json", manifest)
    return manifest


def part_path(round_dir: Path, stage: str, shard: int, num_shards: int) -> Path:
    return shard_dir(round_dir, stage) / f"{part_name(shard, num_shards)}.parquet"


def remove_shards(round_dir: Path, stage: str) -> None:
    shutil.rmtree(shard_dir(round_dir, stage), ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no copy of a large part) where the filesystem allows, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
