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
    batch of 8 within test_distributed.py's rounding bound, and one node × 2 processes' bit for bit."""
    import shutil

    from conftest import run_cli, tiny_overrides
    from slurm_harness import SMALL_JOBS, submit_run
    from test_distributed import DATA, SGD, assert_ddp_update_matches

    cluster = slurm_cluster_2nodes
    common = [*tiny_overrides(tmp_path, tiny_policy, None, "ddp2"), *DATA, *SGD, "precision=fp32"]
    ddp = ["trainer.distributed=ddp", "trainer.batch_size=4"]
    out = run_cli("stage", "prompts,generate,score,pair,margin,select", "round=0", *common, *ddp)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("single", "ddp-1node"):
        shutil.copytree(tmp_path / "ddp2", tmp_path / name)
    single = run_cli("stage", "train", "round=0", *common, "run_name=single", "trainer.batch_size=8")
    assert single.returncode == 0, single.stderr[-3000:]
    one_node = run_cli("stage", "train", "round=0", *common, *ddp, "run_name=ddp-1node", "trainer.num_processes=2")
    assert one_node.returncode == 0, one_node.stderr[-3000:]

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
    from safetensors.torch import load_file

    ours = load_file(rdir / "policy" / "model.safetensors")
    theirs = load_file(tmp_path / "ddp-1node" / "round_00" / "policy" / "model.safetensors")
    assert all((ours[k] == theirs[k]).all() for k in theirs)  # the same 2 ranks, on one machine or two


@pytest.mark.vllm
def test_two_vllm_engines_run_one_on_each_node_and_give_the_one_engine_generations(slurm_cluster_2nodes, tmp_path,
                                                                                    vllm_policy):
    """A 2-node job sources slurm/ray_cluster.sh and runs generate with sampler.num_engines=2 on that Ray cluster:
    one engine per node (host names and addresses as each engine's actor reports them from Ray's runtime context),
    each bound to its own node's core, and the generations equal a local one-engine run's byte for byte."""
    import shutil

    from conftest import run_cli, tiny_overrides

    args = [*tiny_overrides(tmp_path, vllm_policy, None, "local"), "sampler=vllm", "sampler.batch_size=2",
            "sampler.cpu_kv_cache_gb=1"]
    local = run_cli("stage", "prompts,generate", "round=0", *args)
    assert local.returncode == 0, local.stderr[-3000:]
    shutil.copytree(tmp_path / "local", tmp_path / "multi")
    stage = [sys.executable, "-m", "selfplay.cli", "stage", "generate", "round=0", "force=[generate]",
             *[a for a in args if not a.startswith("run_name=")], "run_name=multi", "sampler.num_engines=2"]
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\nset -euo pipefail\nexport SELFPLAY_PYTHON={sys.executable}\n"
                      f"export PYTHONPATH={Path(__file__).parent}\n"
                      f"source {ROOT / 'slurm' / 'ray_cluster.sh'}\n"
                      + " ".join(f"'{word}'" for word in stage) + ' "ray.address=$RAY_ADDRESS"\n')
    cluster = slurm_cluster_2nodes
    job = cluster.sbatch(["-N2", "--ntasks-per-node=1", f"--cpus-per-task={node_cpus(cluster)}",
                          f"--chdir={tmp_path}", "--output=job.log", str(script)])
    cluster.wait([job], timeout=600)
    log = (tmp_path / "job.log").read_text()
    assert cluster.states([job]) == {job: "COMPLETED"}, log[-3000:]
    nodes = node_addresses(cluster)
    assert "ray_cluster.sh: 2/2 node(s) joined" in log
    placed = re.search(r"2 vLLM engine\(s\) for \S+ ready in [\d.]+s: (.*)", log)
    assert placed, log[-3000:]
    cores = dict(line.split() for line in (cluster.dir / "cores.txt").read_text().splitlines())
    listed = {name: "[" + ", ".join(cores[name].split(",")) + "]" for name in cores}
    assert placed.group(1) == (f"engine 0 on n1 ({nodes['n1']}) cores {listed['n1']}; "
                               f"engine 1 on n2 ({nodes['n2']}) cores {listed['n2']}"), placed.group(1)
    part = Path("round_00") / "generations" / "part-00000.parquet"
    assert (tmp_path / "multi" / part).read_bytes() == (tmp_path / "local" / part).read_bytes()
