"""Fault injection: named points where the fault suite (tests/test_faults.py) kills the process with SIGKILL, and
where the pre-emption tests (tests/test_slurm_preemption.py) hold it until they have signalled it.

    SELFPLAY_FAULT_TRACE=FILE        append every point crossed, one `label` per line (the suite's map of a run)
    SELFPLAY_FAULT_KILL=LABEL#K      SIGKILL this process the K-th time (1-based) it crosses LABEL
    SELFPLAY_FAULT_HOLD=LABEL#K@FILE the K-th time it crosses LABEL, wait until FILE exists or a stop signal came
                                     (selfplay/rundir/preemption.py), at most HOLD_S seconds

Labels are `rNN/<stage>/<point>`, e.g. `r01/train/step` or `r00/generate/window`. The points sit where a crash is
most likely to break a resume: between a stage's outputs and its manifest, after each checkpointed chunk of work,
after each training step. With neither variable set a point costs one dict lookup; nothing else changes.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

from selfplay.rundir import preemption

_crossed: Counter[str] = Counter()
HOLD_S = 300.0


def point(label: str) -> None:
    """Mark that this process reached `label`; die here if the kill spec names this crossing."""
    trace, kill, hold = (os.environ.get(f"SELFPLAY_FAULT_{name}") for name in ("TRACE", "KILL", "HOLD"))
    if not trace and not kill and not hold:
        return
    _crossed[label] += 1
    if trace:
        with open(trace, "a") as f:
            f.write(f"{label}\n")
    if kill and kill == f"{label}#{_crossed[label]}":
        os.kill(os.getpid(), signal.SIGKILL)
    if hold and hold.partition("@")[0] == f"{label}#{_crossed[label]}":
        release, deadline = Path(hold.partition("@")[2]), time.monotonic() + HOLD_S
        while not release.exists() and preemption.received() is None and time.monotonic() < deadline:
            time.sleep(0.05)


def stage_label(round_dir_name: str, stage: str, name: str) -> str:
    """`round_01`, `train`, `step` → `r01/train/step`."""
    return f"r{round_dir_name.rsplit('_', 1)[-1]}/{stage}/{name}"
