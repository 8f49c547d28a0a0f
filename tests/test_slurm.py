"""`selfplay submit` and Hydra's submitit launcher against a real single-node SLURM cluster (slurmctld, slurmd and
slurmdbd started by tests/slurm_harness.py): a cancelled array task is the only thing a re-submission reruns, and the
run then equals a local run; a sweep runs as SLURM jobs. (A whole 2-round submission equal to a local run, with
array jobs, multi-node generate and train jobs and a lost Ray node, is in test_slurm_multinode.py.)"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from conftest import assert_same_round, run_cli, tiny_overrides
from slurm_harness import SMALL_JOBS

pytestmark = pytest.mark.slurm

# Generate windows of 2 prompts: both shards of a 6-prompt round have work.
SMALL_BATCHES = ["sampler.batch_size=1", "sampler.sort_window_batches=2"]
@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_policy) -> Path:
    """The reference: the same 2-round config run by `selfplay run` in one process."""
    root = tmp_path_factory.mktemp("local")
    out = run_cli("run", *tiny_overrides(root, tiny_policy, None, "local"), *SMALL_BATCHES)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "local"


def submitted_jobs(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "slurm" / "jobs.json").read_text())["jobs"]


def submit(cluster, *overrides: str) -> subprocess.CompletedProcess:
    out = run_cli("submit", *overrides, env=cluster.env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_a_cancelled_array_task_is_all_a_resubmission_reruns(slurm_cluster, tmp_path, tiny_policy, local_run):
    # score and margin as 2-task arrays too: every sharded stage as an array, each merged by the job after it
    overrides = [*tiny_overrides(tmp_path, tiny_policy, None, "cancel"), "rounds=1", *SMALL_BATCHES,
                 *SMALL_JOBS, "launcher.generate.shards=2", "launcher.score.shards=2", "launcher.margin.shards=2"]
    submit(slurm_cluster, *overrides)
    run_dir = tmp_path / "cancel"
    first = submitted_jobs(run_dir)
    generate = next(job["id"] for job in first if job["name"] == "r00-generate")
    task = f"{generate}_1"
    deadline = time.monotonic() + 300
    while dict(slurm_cluster._listed({generate})).get(task) != "RUNNING":  # cancel it mid-run
        assert time.monotonic() < deadline, "array task 1 never started"
        time.sleep(0.1)
    subprocess.run(["scancel", task], env=slurm_cluster.env, check=True)
    ids = [job["id"] for job in first]
    slurm_cluster.wait(ids, timeout=600)
    states = slurm_cluster.states(ids)
    assert states[f"{generate}_0"] == "COMPLETED" and states[task] == "CANCELLED"
    after = {job["id"] for job in first[first.index(next(j for j in first if j["id"] == generate)) + 1:]}
    # the rest of the chain went with it (an array job that never started may be listed as 12 or as 12_[0-1])
    rest = {job: state for job, state in states.items() if job.split("_")[0] in after}
    assert {job.split("_")[0] for job in rest} == after and set(rest.values()) == {"CANCELLED"}, states
    shard_dir = run_dir / "round_00" / "shards" / "generate"
    kept = (shard_dir / "part-00000-of-00002.done.json").read_text()
    assert not (shard_dir / "part-00001-of-00002.done.json").exists()

    again = submit(slurm_cluster, *overrides)
    second = submitted_jobs(run_dir)
    assert second[0]["name"] == "r00-generate" and second[0]["array"] == "1", again.stdout  # only the cancelled shard
    ids = [job["id"] for job in second]
    slurm_cluster.wait(ids, timeout=600)
    states = slurm_cluster.states(ids)
    assert set(states.values()) == {"COMPLETED"} and f"{second[0]['id']}_1" in states, states
    assert f"{second[0]['id']}_0" not in states, states  # shard 0 was not submitted again
    for stage in ("score", "margin"):
        array = next(job for job in second if job["name"] == f"r00-{stage}")
        assert array["array"] == "0-1" and {f"{array['id']}_0", f"{array['id']}_1"} <= set(states), (second, states)
    assert (shard_dir / "part-00000-of-00002.done.json").read_text() == kept  # shard 0 was not run again
    assert_same_round(run_dir, local_run, 0)


def test_hydra_sweep_runs_as_slurm_jobs(slurm_cluster, tmp_path, tiny_policy):
    # The sweep's run directories are named by the swept key alone (selfplay/runner/sweeps.py), however long the other
    # overrides are: the jobs on the cluster name theirs from the keys the submitting command swept.
    overrides = [*tiny_overrides(tmp_path, tiny_policy, None, "sweep"), "rounds=1"]
    out = run_cli("run", "-m", "selection.metric=map,random", "hydra/launcher=submitit_slurm",
                  "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3", "hydra.launcher.timeout_min=20",
                  *overrides, env=slurm_cluster.env)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dirs = sorted(p.parent.parent for p in (tmp_path / "sweep").rglob("round_00/eval.done.json"))
    assert [d.relative_to(tmp_path / "sweep").as_posix() for d in run_dirs] == [
        "selection.metric=map", "selection.metric=random"]
    assert {"map", "random"} == {
        json.loads((d / "round_00" / "select.done.json").read_text())["config"]["selection"]["metric"] for d in run_dirs}
    assert sorted(json.loads((tmp_path / "sweep" / "sweep.json").read_text())) == [d.name for d in run_dirs]
    # submitit sends the sweep as one array job, a task per run.
    job_ids = sorted({p.name for p in (tmp_path / "sweep" / ".submitit").iterdir() if p.name.isdigit()})
    states = slurm_cluster.states(job_ids)
    assert len(job_ids) == 1 and states == {f"{job_ids[0]}_0": "COMPLETED", f"{job_ids[0]}_1": "COMPLETED"}, states


def test_ray_cluster_script_brings_up_ray_inside_an_allocation(slurm_cluster, tmp_path):
    """slurm/ray_cluster.sh as a multi-node job sources it (here on the one node the test cluster has): the head
    starts through srun, RAY_ADDRESS is exported, and a driver joins it."""
    import shutil
    import sys
    import tempfile

    from conftest import ROOT

    script = tmp_path / "ray.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=1\n#SBATCH --cpus-per-task=1\n#SBATCH --mem=3G\n"
        f"#SBATCH --output={tmp_path}/ray.log\n#SBATCH --chdir={tmp_path}\nset -euo pipefail\nexport SELFPLAY_PYTHON={sys.executable}\n"
        f"source {ROOT / 'slurm' / 'ray_cluster.sh'}\n"
        '"$SELFPLAY_PYTHON" -c \'import os, ray; ray.init(address=os.environ["RAY_ADDRESS"]); '
        f'print("alive", sum(n["Alive"] for n in ray.nodes()))\' > {tmp_path}/nodes.txt\n')
    # Someone else's Ray on the node (another job's, a user's): started here with its own directory.
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    other = tempfile.mkdtemp(prefix="ray-other", dir="/tmp")
    started = subprocess.run([*ray, "start", "--head", "--port=46479", "--num-cpus=1", "--include-dashboard=false",
                              f"--temp-dir={other}", "--disable-usage-stats"], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        others = subprocess.run(["pgrep", "-f", f"{other}/"], capture_output=True, text=True).stdout.split()
        assert others
        job = slurm_cluster.sbatch([str(script)])
        slurm_cluster.wait([job], timeout=300)
        still = subprocess.run(["pgrep", "-f", f"{other}/"], capture_output=True, text=True).stdout.split()
    finally:
        subprocess.run(["pkill", "-KILL", "-f", f"{other}/"])
        shutil.rmtree(other, ignore_errors=True)
    log = (tmp_path / "ray.log").read_text() if (tmp_path / "ray.log").exists() else ""
    assert slurm_cluster.states([job]) == {job: "COMPLETED"}, log[-2000:]
    assert "1/1 node(s) joined" in log
    assert (tmp_path / "nodes.txt").read_text().split() == ["alive", "1"]
    # Ray was stopped with the job, its own processes only: nothing left for a later driver on this node to join by
    # mistake (its address file went with its directory), and a Ray the job did not start is still running.
    assert not Path(f"/tmp/ray-job{job}").exists()
    left = subprocess.run(["pgrep", "-f", f"/tmp/ray-job{job}/"], capture_output=True, text=True)
    assert left.stdout.split() == [], left.stdout
    assert set(others) <= set(still), "the job's exit stopped a Ray it did not start"
