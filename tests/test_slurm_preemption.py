"""Pre-emption on a real SLURM cluster (tests/slurm_harness.py), through the job scripts `selfplay submit` writes:

* the time limit's warning (launcher.signal=B:USR1@30, a 2-minute limit): generate finishes the window in hand,
  checkpoints, exits 75 and the job requeues itself; the requeued task skips the finished windows;
* `scontrol requeue` while train runs (SIGTERM to every process of the job): train checkpoints the optimizer step in
  hand and exits; SLURM requeues the job and the train stage resumes past step 0.

Both runs must end with the same selected pairs and bit-identical weights as a local run of the same config, and
sacct's history of the job (`sacct -D`) must show the requeue."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from conftest import ONE_ROUND, assert_same_round, fault_hold, tiny_overrides, wait_for_crossing
from slurm_harness import SMALL_JOBS, submit_run

pytestmark = pytest.mark.slurm


def attempts(cluster, job: str) -> list[str]:
    """The states sacct has for each attempt of `job` so far (`sacct -D`), oldest first."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State,Start", "-j", job], capture_output=True,
                         text=True, env=cluster.env)
    rows = sorted((line.split("|") for line in out.stdout.splitlines() if line), key=lambda row: row[1])
    return [state.split()[0] for state, _ in rows]


def history(cluster, job: str, timeout: float = 60) -> list[str]:
    """`attempts` once slurmdbd has the last attempt's final state (every earlier one was requeued)."""
    deadline = time.monotonic() + timeout
    while not ((states := attempts(cluster, job)) and set(states[:-1]) <= {"REQUEUED"}
               and states[-1] in ("COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT")):
        assert time.monotonic() < deadline, f"sacct -D {job}: {states}"
        time.sleep(0.5)
    return states


def test_the_time_limit_warning_requeues_generate_which_resumes_past_its_finished_windows(
        slurm_cluster, tmp_path, tiny_policy, one_round_reference):
    # A 2-minute limit with the warning 30 s before it. SLURM may send a warning up to 60 s early, so each attempt
    # is signalled 30-90 s after it starts. The first attempt of each task holds after its first window until then;
    # a requeued attempt needs ~15 s for its 2 windows (should its own warning come first, it requeues again and the
    # next attempt goes on from the windows done).
    env, trace, release = fault_hold(tmp_path, "r00/generate/window#1")
    overrides = [*tiny_overrides(tmp_path, tiny_policy, None, "limit"), *ONE_ROUND, *SMALL_JOBS,
                 "launcher.generate.shards=2", "launcher.generate.time=00:02:00", "launcher.signal=B:USR1@30"]
    jobs = submit_run(slurm_cluster, env, *overrides)
    generate = next(job["id"] for job in jobs if job["name"] == "r00-generate")
    logs = tmp_path / "limit" / "slurm" / "logs"
    tasks = (f"{generate}_0", f"{generate}_1")
    deadline = time.monotonic() + 300
    while not all("REQUEUED" in attempts(slurm_cluster, task) for task in tasks):
        assert time.monotonic() < deadline, [p.read_text()[-1500:] for p in logs.glob("*.out")]
        time.sleep(0.5)
    release.touch()  # the requeued attempts pass their first window straight through
    ids = [job["id"] for job in jobs]
    slurm_cluster.wait(ids, timeout=900)
    for task in tasks:
        states = history(slurm_cluster, task)
        assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", (task, states)
    text = "\n".join(p.read_text() for p in sorted(logs.glob("*r00-generate*.out")))
    assert "selfplay: stopped on SIGUSR1 (finished work is kept); requeueing job" in text
    assert "SIGUSR1 received: stopped after round 0 generate" in text
    for shard in ("0/2", "1/2"):  # each shard's requeued attempt read back what the first one checkpointed
        assert re.search(f"round 0 generate {shard}: [12] of 3 windows were checkpointed by an earlier attempt",
                         text), text[-3000:]
    rest = [i for i in ids if i != generate]
    assert slurm_cluster.states(rest) == dict.fromkeys(rest, "COMPLETED")
    assert_same_round(tmp_path / "limit", one_round_reference, 0)


def test_scontrol_requeue_mid_train_resumes_from_the_step_it_checkpointed(slurm_cluster, tmp_path, tiny_policy,
                                                                          one_round_reference):
    env, trace, release = fault_hold(tmp_path, "r00/train/step#1")
    overrides = [*tiny_overrides(tmp_path, tiny_policy, None, "requeue"), *ONE_ROUND, *SMALL_JOBS,
                 "launcher.generate.shards=1"]
    jobs = submit_run(slurm_cluster, env, *overrides)
    assert len(jobs) == 1  # unsharded: the whole round is one job
    job = jobs[0]["id"]
    wait_for_crossing(trace, "r00/train/step#1", timeout=600)
    subprocess.run(["scontrol", "requeue", job], env=slurm_cluster.env, check=True)
    # The hold ends on the stop signal itself. `release` is for the requeued attempt only (a new process crosses
    # step#1 again), so it is touched once the first attempt has taken SIGTERM: touched at once, it could let the
    # first attempt run on to step 2 before slurmd's signal arrived (seen on a fast processor: resumed from step 2).
    logs = tmp_path / "requeue" / "slurm" / "logs"
    deadline = time.monotonic() + 120
    while "SIGTERM received" not in "".join(f.read_text() for f in logs.glob("*.out")):
        assert time.monotonic() < deadline, "the first attempt never logged SIGTERM"
        time.sleep(0.2)
    release.touch()
    slurm_cluster.wait([job], timeout=900)
    assert history(slurm_cluster, job) == ["REQUEUED", "COMPLETED"]
    rdir = tmp_path / "requeue" / "round_00"
    stats = json.loads((rdir / "train.done.json").read_text())["stats"]
    assert stats["resumed_from_step"] == 1 and stats["steps"] > 1, stats
    log = next(logs.glob("*.out")).read_text()
    assert "SIGTERM received" in log and "round 0 train: resuming from" in log, log[-3000:]
    assert_same_round(tmp_path / "requeue", one_round_reference, 0)
