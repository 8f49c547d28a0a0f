"""Checkpoints inside long stages, so a kill loses at most one chunk of work.

    round_XX/.checkpoints/<stage>/<key>/          key = fingerprint of the stage's config and inputs
        chunk-00003.parquet + chunk-00003.json    generate: one window of prompts (json written last, with sha256)
        checkpoint-40/                            train: TRL/transformers checkpoints (resume_from_checkpoint)

A checkpoint is used only by an attempt with the same config and inputs (another key is another directory) and only
when complete: a chunk's json is written after its parquet and names its checksum; a trainer checkpoint counts once
its trainer_state.json (saved last by transformers) parses. The stage's directory goes when the stage commits.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from selfplay.rundir import atomic, faults
from selfplay.rundir import manifest as mf


def stage_checkpoint_dir(round_dir: Path, stage: str) -> Path:
    return round_dir / ".checkpoints" / stage


def attempt_dir(round_dir: Path, stage: str, config: dict[str, Any], inputs: dict[str, str]) -> Path:
    """Where attempts with this config and these inputs keep their checkpoints."""
    return stage_checkpoint_dir(round_dir, stage) / mf.fingerprint({"config": config, "inputs": inputs})


def clear(round_dir: Path, stage: str) -> None:
    """Drop a stage's checkpoints (its outputs are committed; stale keys go with them)."""
    shutil.rmtree(stage_checkpoint_dir(round_dir, stage), ignore_errors=True)
    parent = round_dir / ".checkpoints"
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


class ChunkStore:
    """Numbered result frames of one stage attempt; each chunk is complete on disk or absent."""

    def __init__(self, directory: Path, label: str):
        self.directory = directory
        self.label = label  # the fault point crossed after each chunk is saved

    def _paths(self, index: int) -> tuple[Path, Path]:
        return self.directory / f"chunk-{index:05d}.parquet", self.directory / f"chunk-{index:05d}.json"

    def has(self, index: int) -> bool:
        """Cheap: the chunk's record is there (load still checks its sha256)."""
        data, meta_path = self._paths(index)
        return data.is_file() and _read_meta(meta_path) is not None

    def load(self, index: int) -> tuple[pd.DataFrame, dict[str, Any]] | None:
        data, meta_path = self._paths(index)
        meta = _read_meta(meta_path)
        if meta is None or not data.is_file() or mf.sha256_file(data) != meta["sha256"]:
            return None
        return pd.read_parquet(data), meta["stats"]

    def save(self, index: int, frame: pd.DataFrame, stats: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data, meta_path = self._paths(index)
        atomic.write_parquet(data, frame)
        atomic.write_json(meta_path, {"sha256": mf.sha256_file(data), "rows": len(frame), "stats": stats})
        faults.point(self.label)


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        return mf.read_json(path)
    except (OSError, ValueError):
        return None


def last_trainer_checkpoint(directory: Path) -> Path | None:
    """The newest complete `checkpoint-N` (its trainer_state.json parses and says step N); incomplete ones removed."""
    complete = []
    for path in directory.glob("checkpoint-*") if directory.is_dir() else []:
        state = _read_meta(path / "trainer_state.json")
        step = path.name.rsplit("-", 1)[-1]
        if state is not None and step.isdigit() and state.get("global_step") == int(step):
            complete.append((int(step), path))
        else:  # killed while saving: model or optimizer files may be cut short
            shutil.rmtree(path, ignore_errors=True)
    return max(complete)[1] if complete else None
