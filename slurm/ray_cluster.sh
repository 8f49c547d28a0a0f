#!/bin/bash
# Bring up a Ray cluster across the nodes of this SLURM allocation; source it from a batch script:
#
#   source ray_cluster.sh        # head on the first node, one worker per other node, all via srun
#   selfplay stage generate round=0 sampler=vllm ray.address="$RAY_ADDRESS"
#
# The batch script itself runs on the first node, next to the head. Each `ray start --block` is an srun step
# that lives as long as the job; they end with it. Exports RAY_ADDRESS (head_ip:port). Ray's own output (what
# `ray start` prints, and srun's word when those steps end with the job) goes to $RAY_CLUSTER_LOG, by default
# ray-cluster-<job id>.log in the current directory, so that the job's log holds the job's own lines.
set -euo pipefail

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head_node=${nodes[0]}
# The head's address as the other nodes see it (first address of the first node).
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" --overlap hostname --ip-address | awk '{print $1}')
port=${RAY_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export RAY_ADDRESS="$head_ip:$port"
# The job script sets SELFPLAY_PYTHON; Ray's CLI sits next to that interpreter.
python_bin="${SELFPLAY_PYTHON:-python3}"
ray_bin="$(dirname "$python_bin")/ray"
[ -x "$ray_bin" ] || ray_bin=ray
# Wait until the cluster at $RAY_ADDRESS has $1 live nodes, in one Python process (importing Ray costs seconds, so
# it is not paid once per poll); prints how many joined, 0 when none answered within $2 seconds.
wait_for_nodes() {
  "$python_bin" - "$RAY_ADDRESS" "$1" "$2" 2>/dev/null <<'PY' || echo 0
import sys, time
import ray
address, wanted, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
alive = 0
while time.monotonic() < deadline:
    try:
        if not ray.is_initialized():
            ray.init(address=address, logging_level="ERROR")
        alive = sum(n["Alive"] for n in ray.nodes())
    except Exception:  # the head is not up yet
        pass
    if alive >= wanted:
        break
    time.sleep(0.5)
print(alive)
PY
}
# The job's Ray accepts only this job's processes: a token of its own, in the environment that srun passes to every
# step and that the pipeline inherits (Ray would otherwise use ~/.ray/auth_token where one exists, and no
# authentication where none does, leaving the cluster open to anyone on the network).
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
export RAY_AUTH_TOKEN
# Ray starts workers at nice 15; vLLM engines then lose their cores to other processes (see vllm_engine.py).
export RAY_worker_niceness=0
cpus=${SLURM_CPUS_PER_TASK:-1}
gpus=${SLURM_GPUS_ON_NODE:-0}

# This job's Ray keeps everything it writes (sockets, logs, its address file) in a directory of its own, and only
# its own processes are stopped when the job's script ends. `ray stop` would stop every Ray on the node: other jobs'
# clusters and other users' drivers. Worker nodes' Ray ends with their srun step.
ray_tmp=${RAY_CLUSTER_TMP:-/tmp/ray-job$SLURM_JOB_ID}
trap 'pkill -KILL -f -- "$ray_tmp/" >/dev/null 2>&1 || true; rm -rf "$ray_tmp"' EXIT
ray_log=${RAY_CLUSTER_LOG:-ray-cluster-$SLURM_JOB_ID.log}
echo "ray_cluster.sh: head $head_node ($RAY_ADDRESS), ${#nodes[@]} node(s); Ray's output in $ray_log"
srun --nodes=1 --ntasks=1 -w "$head_node" --overlap \
  "$ray_bin" start --head --node-ip-address="$head_ip" --port="$port" --temp-dir="$ray_tmp" \
  --num-cpus="$cpus" --num-gpus="$gpus" --block --disable-usage-stats >>"$ray_log" 2>&1 &
# The head is up once its GCS port accepts connections (a bash probe: no Python start per poll).
for _ in $(seq 1 600); do
  (exec 3<>"/dev/tcp/$head_ip/$port") 2>/dev/null && break
  sleep 0.2
done
if (( ${#nodes[@]} > 1 )); then
  srun --nodes=$(( ${#nodes[@]} - 1 )) --ntasks=$(( ${#nodes[@]} - 1 )) --ntasks-per-node=1 -x "$head_node" --overlap \
    "$ray_bin" start --address="$RAY_ADDRESS" --temp-dir="$ray_tmp" --num-cpus="$cpus" --num-gpus="$gpus" --block \
    --disable-usage-stats >>"$ray_log" 2>&1 &
fi
# Every node joined before the pipeline connects: it places engines as soon as it does.
joined=$(wait_for_nodes "${#nodes[@]}" 300)
echo "ray_cluster.sh: ${joined:-?}/${#nodes[@]} node(s) joined"
