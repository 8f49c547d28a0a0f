"""Pre-emption in one process (selfplay/rundir/preemption.py), no SLURM. Each test copies the finished reference run,
takes one stage's manifest away and runs that stage again, held at a fault point until the test signals it:

* generate (SIGUSR1 after its 2nd of 6 windows) and train (SIGTERM after optimizer step 1) finish the window or
  step in hand, checkpoint it and exit 75 without publishing; the same command resumes past that point;
* pair has no safe points: the signal stops it at once, before it commits, and leaves nothing of it behind.

Every resumed stage's outputs are byte-identical to the unbroken run's (the manifests' sha256). The same paths under
a real SLURM cluster (`--signal`, `scontrol requeue`): tests/test_slurm_preemption.py."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
from conftest import ONE_ROUND, fault_hold, run_cli, start_cli, tiny_overrides, wait_for_crossing

STOPS = [
    ("generate", "r00/generate/window#2", signal.SIGUSR1,
     "SIGUSR1 received: stopped after round 0 generate: 2 of 6 windows checkpointed",
     "round 0 generate: 2 of 6 windows were checkpointed by an earlier attempt"),
    ("train", "r00/train/step#1", signal.SIGTERM,
     "round 0 train: stopped at optimizer step 1 of ", "round 0 train: resuming from"),
    ("pair", "r00/pair/start#1", signal.SIGUSR1, "SIGUSR1 received: stopped; nothing partial was written", None),
]


@pytest.mark.parametrize(("stage", "label", "sig", "stopped", "resumed"), STOPS, ids=[s[0] for s in STOPS])
def test_a_stop_signal_stops_the_stage_cleanly_and_the_same_command_resumes(tmp_path, tiny_policy, one_round_reference,
                                                                            stage, label, sig, stopped, resumed):
    shutil.copytree(one_round_reference, tmp_path / "run")
    rdir = tmp_path / "run" / "round_00"
    reference = json.loads((one_round_reference / "round_00" / f"{stage}.done.json").read_text())
    (rdir / f"{stage}.done.json").unlink()
    outputs = {name.split("/")[0] for name in reference["outputs"]}  # files, or directories (policy/, generations/)
    for name in outputs:
        shutil.rmtree(rdir / name) if (rdir / name).is_dir() else (rdir / name).unlink()
    overrides = ["stage", stage, "round=0", *tiny_overrides(tmp_path, tiny_policy, None, "run"), *ONE_ROUND]
    env, trace, release = fault_hold(tmp_path, label)
    proc = start_cli(*overrides, env=env)
    wait_for_crossing(trace, label, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    release.touch()
    assert proc.returncode == 75, stderr[-3000:]
    assert stopped in stderr.strip().splitlines()[-1], stderr[-2000:]
    assert not (rdir / f"{stage}.done.json").exists()  # nothing published
    assert not any((rdir / name).exists() for name in outputs)
    assert not list(rdir.glob(".tmp-*"))
    if stage != "pair":  # the window or step in hand was checkpointed
        assert any((rdir / ".checkpoints" / stage).rglob("*"))

    again = run_cli(*overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    if resumed:
        assert resumed in again.stderr, again.stderr[-3000:]
    manifest = json.loads((rdir / f"{stage}.done.json").read_text())
    if stage == "train":
        assert manifest["stats"]["resumed_from_step"] == 1
    assert manifest["outputs"] == reference["outputs"]  # byte for byte the unbroken run's
    assert not (rdir / ".checkpoints").exists()
