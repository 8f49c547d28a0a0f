"""Fault injection: named points where the fault suite (tests/test_faults.py) kills the process with SIGKILL.

    SELFPLAY_FAULT_TRACE=FILE   append every point crossed, one `label` per line (the suite's map of a run)
    SELFPLAY_FAULT_KILL=LABEL#K SIGKILL this process the K-th time (1-based) it crosses LABEL

Labels are `rNN/<stage>/<point>`, e.g. `r01/train/step` or `r00/generate/window`. The points sit where a crash is
most likely to break a resume: between a stage's outputs and its manifest, after each checkpointed chunk of work,
after each training step. With neither variable set a point costs one dict lookup; nothing else changes.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_crossed: Counter[str] = Counter()


def point(label: str) -> None:
    """Mark that this process reached `label`; die here if the kill spec names this crossing."""
    trace, kill = os.environ.get("SELFPLAY_FAULT_TRACE"), os.environ.get("SELFPLAY_FAULT_KILL")
    if not trace and not kill:
        return
    _crossed[label] += 1
    if trace:
        with open(trace, "a") as f:
            f.write(f"{label}\n")
    if kill and kill == f"{label}#{_crossed[label]}":
        os.kill(os.getpid(), signal.SIGKILL)


def stage_label(round_dir_name: str, stage: str, name: str) -> str:
    """`round_01`, `train`, `step` → `r01/train/step`."""
    return f"r{round_dir_name.rsplit('_', 1)[-1]}/{stage}/{name}"
