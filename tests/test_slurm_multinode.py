"""A real two-node SLURM cluster inside this machine (tests/slurm_harness.py, scripts/slurm_cluster.sh start DIR 2):
nodes n1 and n2 are network namespaces on a private bridge, each with its own host name, address and slurmd. A
2-node job runs a step on each node, and slurm/ray_cluster.sh forms one Ray cluster across them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]


def node_addresses(cluster) -> dict[str, str]:
    rows = (line.split() for line in (cluster.dir / "nodes.txt").read_text().splitlines())
    return {name: address for name, address, _ in rows}


def node_cpus(cluster) -> int:
    """CPUs of each node: its share of this machine's cores (scripts/slurm_cluster.sh writes them to cores.txt)."""
    return len((cluster.dir / "cores.txt").read_text().splitlines()[0].split()[1].split(","))


def local_threads() -> dict[str, str]:
    """Environment giving a job on a node the torch thread count of a process on this whole machine. A node has only
    its share of the cores, and torch sizes its thread pool to them; a matrix product split over fewer threads sums
    in another order, so a job meant to equal a local run bit for bit must use the local run's count."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True,
                         text=True, check=True)
    return {"OMP_NUM_THREADS": out.stdout.strip()}


def test_a_two_node_job_runs_one_step_on_each_node(slurm_cluster_2nodes, tmp_path):
    nodes = node_addresses(slurm_cluster_2nodes)
    assert sorted(nodes) == ["n1", "n2"]
    job = slurm_cluster_2nodes.sbatch([
        "-N2", f"--chdir={tmp_path}", "--output=job.log",
        "--wrap", "srun -N2 --ntasks-per-node=1 sh -c 'echo $(hostname) $(hostname --ip-address)' | sort > steps.txt",
    ])
    slurm_cluster_2nodes.wait([job], timeout=120)
    assert slurm_cluster_2nodes.states([job]) == {job: "COMPLETED"}
    # Each step saw its own node's host name and address: the namespaces are distinct machines to SLURM and to
    # the programs it starts.
    steps = [line.split() for line in (tmp_path / "steps.txt").read_text().splitlines()]
    assert steps == [["n1", nodes["n1"]], ["n2", nodes["n2"]]]


def running_tasks(cluster, job: str) -> dict[str, str]:
    """{array task id: node} of the job's running tasks."""
    import subprocess

    out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i %N", "-j", job], capture_output=True, text=True,
                         env=cluster.env)
    return dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)


def test_a_lost_node_fails_its_array_task_and_a_resubmission_reruns_only_that_shard(slurm_cluster_2nodes, tmp_path,
                                                                                   tiny_policy, one_round_reference):
    """n2 is lost (its slurmd and every process in it SIGKILLed) while a generate task runs there, with
    launcher.requeue=false: the task ends NODE_FAIL, the chain after it is cancelled, the task on n1 completes, and
    submitting again (n2 back) runs only the lost shard; the round equals a local run's."""
    import time

    from conftest import ONE_ROUND, assert_same_round, fault_hold, tiny_overrides
    from slurm_harness import SMALL_JOBS, submit_run

    cluster = slurm_cluster_2nodes
    env, trace, release = fault_hold(tmp_path, "r00/generate/window#1")
    env |= local_threads()
    # a whole node's CPUs per generate task: one task per node
    overrides = [*tiny_overrides(tmp_path, tiny_policy, None, "lost"), *ONE_ROUND, *SMALL_JOBS, "launcher.generate.shards=2",
                 f"launcher.generate.cpus_per_task={node_cpus(cluster)}", "launcher.requeue=false"]
    jobs = submit_run(cluster, env, *overrides)
    ids = [job["id"] for job in jobs]
    generate = next(job["id"] for job in jobs if job["name"] == "r00-generate")
    deadline = time.monotonic() + 300
    while len(placed := running_tasks(cluster, generate)) < 2 or not trace.exists() or (
            trace.read_text().splitlines().count("r00/generate/window") < 2):
        assert time.monotonic() < deadline, f"both tasks never held after a window: {placed}"
        time.sleep(0.2)
    assert sorted(placed.values()) == ["n1", "n2"], placed
    lost = next(task for task, node in placed.items() if node == "n2")
    kept = next(task for task, node in placed.items() if node == "n1")
    cluster.kill_node("n2")
    release.touch()
    try:
        cluster.wait(ids, timeout=300)  # slurmctld declares n2 down after SlurmdTimeout (30 s)
        states = cluster.states(ids)
    finally:
        cluster.start_node("n2")
    assert states[lost] == "NODE_FAIL" and states[kept] == "COMPLETED", states
    after = ids[ids.index(generate) + 1:]
    assert after and all(states[i] == "CANCELLED" for i in after), states  # the chain stopped there
    run_dir = tmp_path / "lost"
    shard = lost.split("_")[1]
    assert (run_dir / "round_00" / "shards" / "generate" / f"part-0000{1 - int(shard)}-of-00002.done.json").exists()

    again = submit_run(cluster, local_threads(), *overrides)
    assert again[0]["name"] == "r00-generate" and again[0]["array"] == shard, again  # only the lost shard
    ids = [job["id"] for job in again]
    cluster.wait(ids, timeout=600)
    states = cluster.states(ids)
    assert states == dict.fromkeys([f"{ids[0]}_{shard}", *ids[1:]], "COMPLETED"), states
    log = "\n".join(p.read_text() for p in (run_dir / "slurm" / "logs").glob(f"*{ids[0]}_{shard}.out"))
    # the lost task's first window was checkpointed on the shared file system before n2 went
    assert f"round 0 generate {shard}/2: 1 of 3 windows were checkpointed by an earlier attempt" in log, log[-2000:]
    assert_same_round(run_dir, one_round_reference, 0)


def kill_ray_on_node(cluster, name: str) -> int:
    """SIGKILL every Ray process in node `name` (its raylet, its `ray start` step, the engine actors in it) and
    nothing else: the node's slurmd stays up, as when Ray crashes on a healthy machine. Returns how many."""
    import os
    import signal
    import subprocess
    import time

    netns = {row.split()[0]: row.split()[2] for row in (cluster.dir / "nodes.txt").read_text().splitlines()}[name]
    killed = 0
    for _ in range(3):  # a process forked while one pass ran goes in the next
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=True).stdout.split()
        for pid in pids:
            try:
                if b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(int(pid), signal.SIGKILL)
                    killed += 1
            except (FileNotFoundError, ProcessLookupError):
                pass
        time.sleep(0.2)
    return killed


@pytest.mark.vllm
def test_a_two_round_multinode_submit_survives_a_lost_ray_node_and_equals_the_local_run(slurm_cluster_2nodes,
                                                                                        tmp_path, vllm_policy):
    """`selfplay submit` of 2 rounds in a job of 2 nodes: slurm/ray_cluster.sh forms one Ray cluster across them,
    generate and eval run one vLLM engine per node (sampler.num_engines=2), and train runs DDP with one rank per node
    (srun + accelerate, gloo). Ray on n2 is killed while round 0's generate is between windows: the stage fails with
    one line naming n2 and writes no generations. The same submission again resumes after the checkpointed window,
    and both rounds equal a local `selfplay run` with one engine and 2 DDP processes on this machine, bit for bit.

    It also stands for two narrower tests it replaced: Ray's cluster over both nodes (each engine reports the host
    and address it runs on, from inside the actor), and DDP across nodes against one process (2 ranks on 2 nodes
    equal 2 ranks on one machine bit for bit here, and test_distributed.py bounds 2 ranks against one process).
    Array jobs and chains across the 2 nodes: the lost-node test above."""
    import time

    import pandas as pd
    from conftest import assert_same_round, fault_hold, run_cli, tiny_overrides
    from slurm_harness import SMALL_JOBS, submit_run

    cluster = slurm_cluster_2nodes
    cpus = node_cpus(cluster)
    # 2 windows of 4 one-prompt chunks per round: each engine takes two chunks of every window
    common = ["sampler=vllm", "sampler.cpu_kv_cache_gb=1", "prompts.per_round=8", "sampler.batch_size=1",
              "sampler.sort_window_batches=4", "trainer.distributed=ddp"]
    local = run_cli("run", *tiny_overrides(tmp_path, vllm_policy, None, "local"), *common, "trainer.num_processes=2",
                    env=local_threads())
    assert local.returncode == 0, local.stderr[-3000:]

    overrides = [*tiny_overrides(tmp_path, vllm_policy, None, "multi"), *common, *SMALL_JOBS, "sampler.num_engines=2",
                 "trainer.num_processes=1", "launcher.requeue=false", "launcher.generate.shards=1",
                 "launcher.generate.nodes=2", f"launcher.generate.cpus_per_task={cpus}", "launcher.train.nodes=2",
                 f"launcher.train.cpus_per_task={cpus}"]
    env, trace, release = fault_hold(tmp_path, "r00/generate/window#1")
    jobs = submit_run(cluster, env | local_threads(), *overrides)
    assert [job["name"] for job in jobs] == ["r00-prompts-to-r01-eval"], jobs  # every stage needs the same 2 nodes
    [job] = jobs
    deadline = time.monotonic() + 600
    while not trace.exists() or "r00/generate/window" not in trace.read_text().splitlines():
        assert time.monotonic() < deadline and cluster.active([job["id"]]), \
            "round 0 generate never finished its first window"
        time.sleep(0.5)
    assert kill_ray_on_node(cluster, "n2") > 0
    release.touch()
    cluster.wait([job["id"]], timeout=300)
    run_dir = tmp_path / "multi"
    logs = run_dir / "slurm" / "logs"
    log = (logs / f"sp-multi-{job['name']}-{job['id']}.out").read_text()
    assert cluster.states([job["id"]]) == {job["id"]: "FAILED"}, log[-3000:]
    errors = [line.split(" - ", 1)[1] for line in log.splitlines() if "[selfplay][ERROR] - " in line]
    address = node_addresses(cluster)["n2"]
    assert len(errors) == 1 and re.fullmatch(
        rf"vLLM engine 1 was lost with its Ray node n2 \({re.escape(address)}\) during chunk "
        r"\d+; nothing of the window in hand was written, and re-running resumes after the last finished one",
        errors[0]), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert not (run_dir / "round_00" / "generations").exists()

    again = submit_run(cluster, local_threads(), *overrides)
    assert [job["name"] for job in again] == ["r00-generate-to-r01-eval"], again  # prompts was done
    [job] = again
    cluster.wait([job["id"]], timeout=1200)
    log = (logs / f"sp-multi-{job['name']}-{job['id']}.out").read_text()
    assert cluster.states([job["id"]]) == {job["id"]: "COMPLETED"}, log[-3000:]
    assert "ray_cluster.sh: 2/2 node(s) joined" in log
    assert "round 0 generate: 1 of 2 windows were checkpointed by an earlier attempt" in log, log[-3000:]
    # where the engines ran: every start is logged with its placement. A job keeps its engines from stage to stage
    # (weights loaded in place), so the starts are round 0's first generate attempt and those the finished stages'
    # manifests record as "started"; the others record "reloaded" or "kept"
    placed = [line for path in sorted(logs.glob("*.out"))
              for line in re.findall(r"2 vLLM engine\(s\) for \S+ ready in [\d.]+s: (.*)", path.read_text())]
    served = [s["engine"] for r in (0, 1) for stage in ("generate", "eval")
              for s in json.loads((run_dir / f"round_{r:02d}" / f"{stage}.done.json").read_text())["stats"]["engines"]]
    assert len(served) >= 4 and served.count("started") < len(served), served
    nodes = node_addresses(cluster)
    assert len(placed) == 1 + served.count("started") and all(re.fullmatch(rf"engine 0 on n1 \({nodes['n1']}\) cores \[[\d, ]+\]; "
                                                 rf"engine 1 on n2 \({nodes['n2']}\) cores \[[\d, ]+\]", line)
                                    for line in placed), placed
    # DDP across the nodes: one gloo rank on each, launched through srun
    assert "train: ddp on 2 node(s) × 1 process(es)" in log and "srun --nodes 2" in log, log[-3000:]
    for r in (0, 1):
        ranks = (run_dir / f"round_{r:02d}" / "train.ranks.log").read_text()
        assert sorted(set(re.findall(r"selfplay train rank \d+ of 2 on (\S+)", ranks))) == ["n1", "n2"], ranks[-2000:]
        stats = json.loads((run_dir / f"round_{r:02d}" / "train.done.json").read_text())["stats"]
        assert stats["world_size"] == 2, stats
        generations = [pd.read_parquet(d / f"round_{r:02d}" / "generations") for d in (run_dir, tmp_path / "local")]
        pd.testing.assert_frame_equal(*generations, check_exact=True)
        assert_same_round(run_dir, tmp_path / "local", r)
    assert (run_dir / "report.md").exists()
    status = run_cli("status", str(run_dir), "--json")
    assert json.loads(status.stdout)["missing"] == []
