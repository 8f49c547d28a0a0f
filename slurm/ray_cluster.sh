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
alive_nodes() {
  "$python_bin" -c 'import ray, sys; ray.init(address=sys.argv[1], logging_level="ERROR")
print(sum(n["Alive"] for n in ray.nodes()))' "$RAY_ADDRESS" 2>/dev/null || echo 0
}
# Ray starts workers at nice 15; vLLM engines then lose their cores to other processes (see vllm_engine.py).
export RAY_worker_niceness=0
cpus=${SLURM_CPUS_PER_TASK:-1}
gpus=${SLURM_GPUS_ON_NODE:-0}

# When the job's script ends, stop Ray on this node: a head killed with its srun step leaves its address file
# behind (/tmp/ray/ray_current_cluster), and later drivers on the node would try to join the dead cluster.
trap '"$ray_bin" stop --force >/dev/null 2>&1 || true' EXIT
ray_log=${RAY_CLUSTER_LOG:-ray-cluster-$SLURM_JOB_ID.log}
echo "ray_cluster.sh: head $head_node ($RAY_ADDRESS), ${#nodes[@]} node(s); Ray's output in $ray_log"
srun --nodes=1 --ntasks=1 -w "$head_node" --overlap \
  "$ray_bin" start --head --node-ip-address="$head_ip" --port="$port" \
  --num-cpus="$cpus" --num-gpus="$gpus" --block --disable-usage-stats >>"$ray_log" 2>&1 &
# Wait for the head before the workers join it.
for _ in $(seq 1 60); do
  (( $(alive_nodes) >= 1 )) && break
  sleep 2
done
if (( ${#nodes[@]} > 1 )); then
  srun --nodes=$(( ${#nodes[@]} - 1 )) --ntasks=$(( ${#nodes[@]} - 1 )) --ntasks-per-node=1 -x "$head_node" --overlap \
    "$ray_bin" start --address="$RAY_ADDRESS" --num-cpus="$cpus" --num-gpus="$gpus" --block --disable-usage-stats \
    >>"$ray_log" 2>&1 &
fi
# Wait until every node has joined (the pipeline places engines as soon as it connects).
for _ in $(seq 1 90); do
  joined=$(alive_nodes)
  (( joined >= ${#nodes[@]} )) && break
  sleep 2
done
echo "ray_cluster.sh: ${joined:-?}/${#nodes[@]} node(s) joined"
