"""Pre-emption: stop at the next safe point when the job is told to, checkpoint, and exit for a requeue.

SLURM tells a job to stop in two ways: SIGTERM (scancel, `scontrol requeue`, pre-emption by a higher-priority job;
SIGKILL follows after the cluster's KillWait) and, with `--signal=B:USR1@120` (launcher.signal), a chosen signal
some seconds before the time limit. `selfplay stage`/`run` take SIGTERM, SIGUSR1 and SIGUSR2 here:

* inside a long stage's `safe_points` section (generate between windows, train between optimizer steps) the
  signal is only recorded; the stage finishes the window or step it is in, writes its checkpoint (generate's
  window chunk, a trainer checkpoint) and raises `Preempted` at its next `check`;
* anywhere else, and at a second signal, `Preempted` is raised at once: nothing is published before a stage
  commits, so stopping there leaves nothing partial, only less done.

The command then exits with EXIT_PREEMPTED (75). The job script `selfplay submit` writes passes launcher.signal on
to the stage and, on 75 after that signal, requeues its own job (`scontrol requeue`); the requeued job runs the
same command, which resumes from the checkpoints (skips finished windows, resumes training past step 0).

The processes of a distributed train stage learn of the signal through a flag file (FLAG_ENV names it) that the
stage process touches; at each step the ranks agree (an all-reduce) so that every rank stops at the same step.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

log = logging.getLogger("selfplay")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later, from the checkpoint
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
FLAG_ENV = "SELFPLAY_PREEMPT_FLAG"  # file whose existence tells a distributed train rank to stop


class Preempted(BaseException):
    """The job was told to stop; what was complete is on disk and the same command resumes. A BaseException, like
    KeyboardInterrupt: raised from a signal handler anywhere, it must not be swallowed by an `except Exception`
    (a reward checker that counts an exception as a failed check, a wrapper that rewords errors)."""


_state: dict = {"signal": None, "safe_depth": 0}


def install() -> None:
    """Take SIGTERM/SIGUSR1/SIGUSR2 in this process (the main thread only, as Python requires)."""
    _state["previous"] = {sig: signal.signal(sig, _on_signal) for sig in SIGNALS}


def uninstall() -> None:
    """Give the signals back to the handlers they had before `install` (a no-op without one)."""
    for sig, handler in _state.pop("previous", {}).items():
        signal.signal(sig, handler)


def _on_signal(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    again = _state["signal"] is not None
    _state["signal"] = name
    if flag := os.environ.get(FLAG_ENV):
        with suppress(OSError):
            Path(flag).touch()
    if _state["safe_depth"] == 0 or again:
        raise Preempted(f"{name} received{' again' if again else ''}: stopped; nothing partial was written, re-run "
                        "the same command to resume")
    log.warning("%s received: finishing the current step, then checkpointing and exiting so the job can be "
                "requeued", name)


def received() -> str | None:
    """The signal that asked this process to stop (or 'flag' when told through FLAG_ENV), else None."""
    if _state["signal"] is None and (flag := os.environ.get(FLAG_ENV)) and Path(flag).exists():
        _state["signal"] = "flag"
    return _state["signal"]


@contextmanager
def safe_points() -> Iterator[None]:
    """Within this block a stop signal waits for the next `check` instead of interrupting."""
    _state["safe_depth"] += 1
    try:
        yield
    finally:
        _state["safe_depth"] -= 1


def check(where: str) -> None:
    """Raise Preempted if a stop signal came: `where` says what is safely on disk."""
    if (name := received()) is not None:
        raise Preempted(f"{name} received: stopped after {where}; re-run the same command (or let SLURM requeue "
                        "the job) to resume from there")


def agreed() -> bool:
    """Whether any rank of a distributed run was told to stop (every rank calls it at the same step), or, outside
    one, whether this process was."""
    import torch
    import torch.distributed as dist

    local = received() is not None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(local)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
