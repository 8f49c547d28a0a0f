"""One run, one writer (selfplay/runner/runlock.py), Ctrl-C, sweep directories and half-finished reports, through the real
`selfplay` command. Rows of the bad-input table (docs/reliability.md): run_locked, interrupted, sweep_names, report_unfinished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import run_cli, start_cli, tiny_overrides
from test_faults import partial_files


def _start(*args: str):
    # In its own session with SIGINT's default disposition, as a terminal's foreground job has (a test run started
    # in the background, `cmd &`, as CI may, would otherwise pass SIGINT ignored on).
    return start_cli(*args)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited {proc.returncode} early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _holder_notes(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (run_dir / ".lock.holders").glob("*.json")]


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(tmp_path, tiny_policy):
    overrides = tiny_overrides(tmp_path, tiny_policy, None, run_name="locked")
    run_dir = tmp_path / "locked"
    first = _start("run", *overrides, "reward.function=rewards_for_tests:slow")  # holds its score stage 2 min
    try:
        _wait_for(lambda: (run_dir / "round_00" / ".tmp-score").exists(), first)
        hydra_files = {p: p.read_bytes() for p in (run_dir / ".hydra").glob("*")}
        for command in (["run"], ["stage", "prompts", "round=0"], ["submit"]):
            second = run_cli(*command, *overrides)
            assert second.returncode == 2, second.stderr[-2000:]
            assert "is being written by another selfplay process: pid " + str(first.pid) in second.stderr
            assert "Traceback" not in second.stderr
        # The refused commands touched nothing: not Hydra's files, not the writer's temp directory.
        assert {p: p.read_bytes() for p in (run_dir / ".hydra").glob("*")} == hydra_files
        assert (run_dir / "round_00" / ".tmp-score").exists()
        first.send_signal(signal.SIGKILL)
        first.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
    # The killed holder's lock went with it: the same command runs and finishes the run.
    resumed = run_cli("run", *overrides, "rounds=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "round_00" / "eval.done.json").exists() and partial_files(run_dir) == []
    assert _holder_notes(run_dir) == []  # each holder's note goes at its exit


def test_the_shards_of_one_stage_run_at_once(tmp_path, tiny_policy):
    from selfplay.runner import runlock

    overrides = tiny_overrides(tmp_path, tiny_policy, None, run_name="sharded")
    run_dir = tmp_path / "sharded"
    assert run_cli("stage", "prompts", "round=0", *overrides).returncode == 0
    # This process holds the lock as shard 0 would: the other shard starts beside it, a whole run does not.
    runlock.acquire(run_dir, shared=True, command="test shard holder")
    try:
        other = run_cli("stage", "generate", "round=0", "shard=1", "num_shards=2", *overrides)
        assert other.returncode == 0, other.stderr[-3000:]
        whole = run_cli("stage", "generate", "round=0", *overrides)
        assert whole.returncode == 2 and f"pid {os.getpid()}" in whole.stderr and "test shard holder" in whole.stderr
    finally:
        runlock.release(run_dir)
    # And the two shard processes of a 2-task array, started together, both finish.
    overrides = tiny_overrides(tmp_path, tiny_policy, None, run_name="array")
    assert run_cli("stage", "prompts", "round=0", *overrides).returncode == 0
    shards = [_start("stage", "generate", "round=0", f"shard={i}", "num_shards=2", *overrides) for i in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in shards]
    assert [p.returncode for p in shards] == [0, 0], [err[-2000:] for _, err in outputs]


def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing_partial(tmp_path, tiny_policy):
    overrides = tiny_overrides(tmp_path, tiny_policy, None, run_name="interrupted")
    run_dir = tmp_path / "interrupted"
    proc = _start("run", *overrides, "reward.function=rewards_for_tests:slow")
    _wait_for(lambda: (run_dir / "round_00" / ".tmp-score").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted; re-run the same command to resume (finished stages are kept)" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    rdir = run_dir / "round_00"
    assert (rdir / "generate.done.json").exists() and not (rdir / ".tmp-score").exists()
    assert partial_files(run_dir) == []


def test_sweep_directories_name_the_swept_keys_and_status_lists_every_run(tmp_path, tiny_policy):
    overrides = [o for o in tiny_overrides(tmp_path, tiny_policy, None, run_name="sweep") if not o.startswith("rounds=")]
    # A path-valued sweep: each directory names the path's last part and a hash, one level, no escapes.
    other = tmp_path / "policies" / "other-policy"
    other.parent.mkdir()
    other.symlink_to(tiny_policy, target_is_directory=True)
    models = [o for o in overrides if o.startswith("model.path=")][0]
    overrides = [o for o in overrides if o != models]
    proc = run_cli("stage", "prompts", "-m", "round=0", "seed=0,1", f"model.path={tiny_policy},{other}", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "sweep"
    runs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 4 and all(len(name) <= 120 and "/" not in name and "\\" not in name for name in runs)
    assert {name.split(",")[0] for name in runs} == {"seed=0", "seed=1"}
    assert any(",model.path=other-policy-" in name for name in runs)
    assert all((root / name / "round_00" / "prompts.done.json").exists() for name in runs)
    sweep_map = json.loads((root / "sweep.json").read_text())
    assert sorted(sweep_map) == runs and all(f"model.path={other}" in sweep_map[n] for n in runs if "other" in n)
    status = run_cli("status", str(root))
    assert status.returncode == 0, status.stderr
    assert f"sweep {root}: 4 runs" in status.stdout and all(f"== {name}" in status.stdout for name in runs)


def test_report_of_a_half_finished_run_names_the_missing_stages(tmp_path, tiny_policy):
    overrides = tiny_overrides(tmp_path, tiny_policy, None, run_name="half")
    assert run_cli("stage", "prompts,generate", "round=0", *overrides).returncode == 0
    proc = run_cli("report", str(tmp_path / "half"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is not finished" in proc.stderr
    report = (tmp_path / "half" / "report.md").read_text()
    assert "## Not finished" in report and "round_00/score" in report and "round_01/eval" in report
