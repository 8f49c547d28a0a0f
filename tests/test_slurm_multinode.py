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


def test_ray_cluster_sh_forms_one_ray_cluster_across_both_nodes(slurm_cluster_2nodes, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, socket, sys\n"
        "import ray\n"
        "ray.init(logging_level='ERROR')\n"
        "from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On\n"
        "@ray.remote(num_cpus=1)\n"
        "def where():\n"
        "    return socket.gethostname(), ray.util.get_node_ip_address()\n"
        "alive = [n for n in ray.nodes() if n['Alive']]\n"
        "placed = [ray.get(where.options(scheduling_strategy=On(n['NodeID'], soft=False)).remote()) for n in alive]\n"
        "json.dump({'nodes': sorted(n['NodeManagerAddress'] for n in alive), 'tasks': sorted(placed)},\n"
        "          open(sys.argv[1], 'w'))\n")
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\nset -euo pipefail\nexport SELFPLAY_PYTHON={sys.executable}\n"
                      f"source {ROOT / 'slurm' / 'ray_cluster.sh'}\n"
                      f'"$SELFPLAY_PYTHON" {probe} {tmp_path / "ray.json"}\n')
    job = slurm_cluster_2nodes.sbatch(["-N2", "--ntasks-per-node=1", f"--chdir={tmp_path}", "--output=job.log",
                                       str(script)])
    slurm_cluster_2nodes.wait([job], timeout=300)
    log = (tmp_path / "job.log").read_text()
    assert slurm_cluster_2nodes.states([job]) == {job: "COMPLETED"}, log[-3000:]
    nodes = node_addresses(slurm_cluster_2nodes)
    seen = json.loads((tmp_path / "ray.json").read_text())
    # Ray's state API lists both nodes alive, by the addresses of n1 and n2, and a task pinned to each ran there.
    assert seen["nodes"] == sorted(nodes.values())
    assert seen["tasks"] == sorted([name, address] for name, address in nodes.items())
    assert "ray_cluster.sh: 2/2 node(s) joined" in log


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


def test_ddp_across_two_nodes_matches_one_process(slurm_cluster_2nodes, tmp_path, tiny_policy):
    """`selfplay submit` of a round whose train job has 2 nodes (trainer.distributed=ddp, one gloo process per
    node, `srun` + accelerate): the ranks run on n1 and n2, and the update equals one process's on the same global
    batch of 8 within test_distributed.py's rounding bound. (That 2 ranks on two nodes equal 2 on one machine bit for
    bit is checked over two whole rounds by the multi-node submit test below.)"""
    import shutil

    from conftest import run_cli, tiny_overrides
    from slurm_harness import SMALL_JOBS, submit_run
    from test_distributed import DATA, SGD, assert_ddp_update_matches

    cluster = slurm_cluster_2nodes
    common = [*tiny_overrides(tmp_path, tiny_policy, None, "ddp2"), *DATA, *SGD, "precision=fp32"]
    ddp = ["trainer.distributed=ddp", "trainer.batch_size=4"]
    out = run_cli("stage", "prompts,generate,score,pair,margin,select", "round=0", *common, *ddp)
    assert out.returncode == 0, out.stderr[-3000:]
    shutil.copytree(tmp_path / "ddp2", tmp_path / "single")
    single = run_cli("stage", "train", "round=0", *common, "run_name=single", "trainer.batch_size=8")
    assert single.returncode == 0, single.stderr[-3000:]

    jobs = submit_run(cluster, {}, *common, *ddp, *SMALL_JOBS, "trainer.num_processes=1", "launcher.train.nodes=2",
                      f"launcher.train.cpus_per_task={node_cpus(cluster)}")
    assert [job["name"] for job in jobs] == ["r00-train-to-eval"], jobs
    cluster.wait([jobs[0]["id"]], timeout=900)
    rdir = tmp_path / "ddp2" / "round_00"
    log = (rdir / "train.ranks.log").read_text() if (rdir / "train.ranks.log").exists() else ""
    assert cluster.states([jobs[0]["id"]]) == {jobs[0]["id"]: "COMPLETED"}, log[-3000:]
    stats = json.loads((rdir / "train.done.json").read_text())["stats"]
    assert stats["world_size"] == 2 and stats["steps"] == 1 and stats["pairs"] == 8, stats
    job_log = next((tmp_path / "ddp2" / "slurm" / "logs").glob("*.out")).read_text()
    assert "train: ddp on 2 node(s) × 1 process(es)" in job_log and "srun --nodes 2" in job_log, job_log[-3000:]
    hosts = sorted(set(re.findall(r"selfplay train rank \d+ of 2 on (\S+)", log)))
    assert hosts == ["n1", "n2"], log[-3000:]
    assert_ddp_update_matches(rdir / "policy", tmp_path / "single" / "round_00" / "policy", tiny_policy, "fp32",
                              "ddp on 2 nodes")


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
    """`selfplay submit` of 2 rounds whose generate jobs hold 2 nodes (slurm/ray_cluster.sh, sampler.num_engines=2:
    one vLLM engine per node) and whose train jobs hold 2 nodes (DDP, one rank per node). Ray on n2 is killed while
    round 0's generate is between windows: the stage fails with one line naming n2 and writes no generations. The
    same submission again resumes after the checkpointed window, and both rounds equal a local `selfplay run` with
    one engine and 2 DDP processes on this machine, bit for bit."""
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
                 f"launcher.train.cpus_per_task={cpus}", "launcher.score.shards=2"]
    env, trace, release = fault_hold(tmp_path, "r00/generate/window#1")
    jobs = submit_run(cluster, env | local_threads(), *overrides)
    ids = [job["id"] for job in jobs]
    generate = next(job for job in jobs if re.fullmatch(r"r00-(prompts-to-)?generate", job["name"]))
    after = ids[ids.index(generate["id"]) + 1:]
    deadline = time.monotonic() + 600
    while not trace.exists() or "r00/generate/window" not in trace.read_text().splitlines():
        assert time.monotonic() < deadline and cluster.active([generate["id"]]), \
            "round 0 generate never finished its first window"
        time.sleep(0.5)
    assert kill_ray_on_node(cluster, "n2") > 0
    release.touch()
    cluster.wait(ids, timeout=300)
    states = cluster.states(ids)
    run_dir = tmp_path / "multi"
    logs = run_dir / "slurm" / "logs"
    log = (logs / f"sp-multi-{generate['name']}-{generate['id']}.out").read_text()
    assert states[generate["id"]] == "FAILED", (states, log[-3000:])
    # the chain stopped there (an array job never started may be listed as 12 or as 12_[0-1])
    rest = [(job.split("_")[0], state) for job, state in states.items() if job != generate["id"]]
    assert after and {job for job, _ in rest} == set(after) and {state for _, state in rest} == {"CANCELLED"}, states
    errors = [line.split(" - ", 1)[1] for line in log.splitlines() if "[selfplay][ERROR] - " in line]
    address = node_addresses(cluster)["n2"]
    assert len(errors) == 1 and re.fullmatch(
        rf"vLLM engine 1 was lost with its Ray node n2 \({re.escape(address)}\) during chunk "
        r"\d+; nothing of the window in hand was written, and re-running resumes after the last finished one",
        errors[0]), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert not (run_dir / "round_00" / "generations").exists()

    again = submit_run(cluster, local_threads(), *overrides)
    ids = [job["id"] for job in again]
    cluster.wait(ids, timeout=1200)
    states = cluster.states(ids)
    assert set(states.values()) == {"COMPLETED"}, states
    assert again[0]["name"] == "r00-generate", again  # prompts was done
    log = (logs / f"sp-multi-r00-generate-{again[0]['id']}.out").read_text()
    assert "round 0 generate: 1 of 2 windows were checkpointed by an earlier attempt" in log, log[-3000:]
    # where the engines ran: round 0's two generate attempts, round 1's generate, and each round's eval
    placed = [line for path in sorted(logs.glob("*.out"))
              for line in re.findall(r"2 vLLM engine\(s\) for \S+ ready in [\d.]+s: (.*)", path.read_text())]
    nodes = node_addresses(cluster)
    assert len(placed) == 5 and all(re.fullmatch(rf"engine 0 on n1 \({nodes['n1']}\) cores \[[\d, ]+\]; "
                                                 rf"engine 1 on n2 \({nodes['n2']}\) cores \[[\d, ]+\]", line)
                                    for line in placed), placed
    for r in (0, 1):
        ranks = (run_dir / f"round_{r:02d}" / "train.ranks.log").read_text()
        assert sorted(set(re.findall(r"selfplay train rank \d+ of 2 on (\S+)", ranks))) == ["n1", "n2"], ranks[-2000:]
        generations = [pd.read_parquet(d / f"round_{r:02d}" / "generations") for d in (run_dir, tmp_path / "local")]
        pd.testing.assert_frame_equal(*generations, check_exact=True)
        assert_same_round(run_dir, tmp_path / "local", r)
    assert (run_dir / "report.md").exists()
    status = run_cli("status", str(run_dir), "--json")
    assert json.loads(status.stdout)["missing"] == []
