"""A real two-node SLURM cluster inside this machine (tests/slurm_harness.py, scripts/slurm_cluster.sh start DIR 2):
nodes n1 and n2 are network namespaces on a private bridge, each with its own host name, address and slurmd. A
2-node job runs a step on each node, and slurm/ray_cluster.sh forms one Ray cluster across them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]


def node_addresses(cluster) -> dict[str, str]:
    rows = (line.split() for line in (cluster.dir / "nodes.txt").read_text().splitlines())
    return {name: address for name, address, _ in rows}


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
