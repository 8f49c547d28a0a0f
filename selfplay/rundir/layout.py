"""The run directory's names, in one place: every module that builds or parses a path inside a run asks here.

    <run>/config.yaml                  the resolved config of the latest command, less PER_COMMAND_KEYS
    <run>/round_XX/                    one round: its stages' outputs and manifests (<stage>.done.json)
    <run>/round_XX/.tmp-<stage>/       a stage's scratch until it commits
    <run>/.lock                        held while a command writes the run (selfplay/runner/runlock.py)
"""

from __future__ import annotations

import re
from pathlib import Path

_ROUND = re.compile(r"round_(\d{2,})")


def round_name(r: int) -> str:
    return f"round_{r:02d}"


def round_dir(run_dir: Path, r: int) -> Path:
    return run_dir / round_name(r)


def round_index(name: str) -> int | None:
    """`round_03` → 3; None for any other name."""
    match = _ROUND.fullmatch(name)
    return int(match.group(1)) if match else None


def round_stage(r: int, stage: str) -> str:
    """`round_03/train`: how messages and manifests' input keys name a stage of a round."""
    return f"{round_name(r)}/{stage}"


def stage_scratch(run_dir: Path, r: int, stage: str) -> Path:
    return round_dir(run_dir, r) / f".tmp-{stage}"
