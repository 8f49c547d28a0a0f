"""The train stage across processes, GPUs and nodes: `trainer.distributed=ddp|fsdp|deepspeed_zero3`.

    train stage (one process) ── accelerate launch --config_file conf/distributed/<strategy>.yaml ──► N ranks
                                   (several nodes under SLURM: srun starts one launcher per node)

Every rank runs `selfplay.train_worker` (the same `train_policy` as the single-process path); only the main rank
writes the policy and its stats, and the stage writes the manifest after the launcher exits 0. A failed rank fails
the stage with that rank's error.

Processes per node: `trainer.num_processes`, or every GPU this process sees (CUDA_VISIBLE_DEVICES, which SLURM sets
from --gpus-per-node). Nodes: SLURM_NNODES inside a SLURM job (main address = the job's first node, port from the
job id), else 1.

Memory planning (`estimate_memory`): before any rank starts, the stage prints the estimated peak per device and
refuses when it does not fit (`trainer.memory_check`):

    weights     P · b / S            P parameters, b bytes per weight (model.dtype), S = world size for fsdp and
    gradients   T · b / S            deepspeed_zero3 (sharded), else 1; T trainable parameters (LoRA: its adapters)
    optimizer   T · 8 / S            AdamW's two fp32 moments
    activations 2B · L · (n · h · a + 8 · V)
                                     2B sequences (chosen + rejected) of L = trainer.max_length tokens; n layers of
                                     width h keep a = 17·b bytes per unit (Korthikanti et al. 2022, no recompute),
                                     or 2·b with trainer.gradient_checkpointing; fp32 logits and log-softmax over V
It is an estimate (±2×): it ignores the CUDA context, fragmentation and temporary buffers.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfplay.backends.modeling import torch_device
from selfplay.backends.precision import train_bf16
from selfplay.config import conf_dir
from selfplay.errors import SelfplayError
from selfplay.rundir import preemption

log = logging.getLogger("selfplay")

STRATEGIES = ("none", "ddp", "fsdp", "deepspeed_zero3")
SHARDED = ("fsdp", "deepspeed_zero3")
GIB = 1024**3


def accelerate_config(strategy: str) -> Path:
    return conf_dir() / "distributed" / f"{strategy}.yaml"


def processes_per_node(cfg: Any) -> int:
    if cfg.trainer.num_processes:
        return int(cfg.trainer.num_processes)
    import torch

    return max(torch.cuda.device_count(), 1)


@dataclass
class Topology:
    nodes: int
    per_node: int
    main_address: str
    main_port: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.per_node


def topology(cfg: Any, env: dict[str, str] | None = None) -> Topology:
    """Nodes and ranks of this allocation: SLURM's when inside a multi-node job, else this machine alone."""
    env = dict(os.environ if env is None else env)
    nodes = int(env.get("SLURM_NNODES", "1")) if "SLURM_JOB_ID" in env else 1
    address, port = "127.0.0.1", 29500 + int(env.get("SLURM_JOB_ID", os.getpid())) % 10000
    if nodes > 1:
        hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                               text=True, check=True).stdout.split()
        address = hosts[0]
    return Topology(nodes=nodes, per_node=processes_per_node(cfg), main_address=address, main_port=port)


def launch_command(cfg: Any, topo: Topology, worker_args: list[str], machine_rank: str = "0") -> list[str]:
    """`accelerate launch` of the train worker with this strategy's config file and the allocation's topology."""
    t = cfg.trainer
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(t.distributed)),
               "--num_processes", str(topo.world_size), "--num_machines", str(topo.nodes),
               "--machine_rank", machine_rank, "--main_process_ip", topo.main_address,
               "--main_process_port", str(topo.main_port), "--mixed_precision", "bf16" if train_bf16(cfg) else "no"]
    if t.distributed == "deepspeed_zero3":
        command += ["--gradient_accumulation_steps", str(t.gradient_accumulation_steps)]
    return [*command, "-m", "selfplay.train_worker", *worker_args]


def run_distributed(cfg: Any, worker_args: list[str], log_path: Path) -> None:
    """Launch every rank (through srun on each node when the SLURM job has several) and wait; a failed rank raises
    with the end of its output."""
    topo = topology(cfg)
    env = {**os.environ}
    if str(cfg.device) == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # ranks on CPU talk over gloo
    if topo.nodes > 1:
        # One launcher per node; each takes its machine rank from SLURM_NODEID on its own node.
        inner = launch_command(cfg, topo, worker_args, machine_rank="$SLURM_NODEID")
        quoted = " ".join(a if a == "$SLURM_NODEID" else shlex.quote(a) for a in inner)
        command = ["srun", "--nodes", str(topo.nodes), "--ntasks-per-node", "1", "--overlap", "bash", "-c", quoted]
    else:
        command = launch_command(cfg, topo, worker_args)
    log.info("train: %s on %d node(s) × %d process(es): %s", cfg.trainer.distributed, topo.nodes, topo.per_node,
             " ".join(command))
    # A stop signal to this process reaches the ranks (on every node) through a flag file in the round directory.
    flag = log_path.with_name(log_path.name + ".stop")
    flag.unlink(missing_ok=True)
    env[preemption.FLAG_ENV] = str(flag)
    with open(log_path, "w") as out, preemption.safe_points():
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    flag.unlink(missing_ok=True)
    if code != 0 and preemption.received() is not None:
        raise preemption.Preempted(f"train: told to stop; the ranks saved a checkpoint at the same optimizer step "
                                   f"and exited (log: {log_path}); the same command resumes from there")
    if code != 0:
        raise SelfplayError(f"train: a rank failed (exit {code}); its error:\n{rank_error(log_path.read_text())}\n"
                            f"full log: {log_path}")


def rank_error(output: str, lines: int = 25) -> str:
    """The first rank's traceback (or selfplay error line) in the launcher's combined output."""
    text = output.splitlines()
    start = next((i for i, line in enumerate(text) if "Traceback (most recent call last)" in line
                  or re.search(r"\berror: ", line)), max(len(text) - lines, 0))
    return "\n".join(text[start:start + lines])


# ---------------------------------------------------------------- memory planning


def _bytes_per_weight(dtype: str, model_config: Any) -> int:
    if dtype == "auto":
        dtype = str(getattr(model_config, "torch_dtype", None) or getattr(model_config, "dtype", "float32"))
    return 2 if ("16" in dtype) else 4


def count_parameters(model_path: Path, cfg: Any) -> tuple[int, int, Any]:
    """(all parameters, trainable ones, model config), from an empty (meta-device) model: nothing is loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=cfg.model.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    trainable = total
    if cfg.trainer.peft == "lora":
        from peft import get_peft_model

        try:
            adapted = get_peft_model(model, lora_config(cfg))
        except ValueError as err:  # e.g. target modules the model does not have
            raise SelfplayError(f"trainer.lora_target_modules: {err}") from err
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    return total, trainable, model_config


def lora_config(cfg: Any) -> Any:
    from peft import LoraConfig

    t = cfg.trainer
    targets = list(t.lora_target_modules) if not isinstance(t.lora_target_modules, str) else t.lora_target_modules
    return LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


def estimate_memory(cfg: Any, model_path: Path, world_size: int) -> dict[str, float]:
    """Estimated peak memory per device, by component (the module docstring's formula), in GiB."""
    total, trainable, mc = count_parameters(model_path, cfg)
    t = cfg.trainer
    b = 2 if train_bf16(cfg) and cfg.model.dtype == "auto" else _bytes_per_weight(cfg.model.dtype, mc)
    shard = world_size if t.distributed in SHARDED else 1
    layers = getattr(mc, "num_hidden_layers", 0) or 0
    hidden = getattr(mc, "hidden_size", 0) or 0
    vocab = getattr(mc, "vocab_size", 0) or 0
    per_unit = 2 * b if t.gradient_checkpointing else 17 * b
    sequences = 2 * t.batch_size
    parts = {
        "weights": total * b / shard,
        "gradients": trainable * b / shard,
        "optimizer": trainable * 8 / shard,
        "activations": sequences * t.max_length * (layers * hidden * per_unit + 8 * vocab),
    }
    out: dict[str, float] = {k: v / GIB for k, v in parts.items()}
    out["total"] = sum(parts.values()) / GIB
    out["parameters"] = total
    out["trainable_parameters"] = trainable
    return out


def device_capacity_gib(cfg: Any, per_node: int) -> tuple[float, str]:
    """Memory one rank may use: the GPU's, or on CPU the available RAM shared by this node's ranks."""
    import torch

    device = torch_device(cfg.device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device.index or 0)
        return props.total_memory / GIB, props.name
    available = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    return available / GIB / max(per_node, 1), "CPU RAM (available, per process)"


def plan_memory(cfg: Any, model_path: Path) -> dict[str, float]:
    """Print the estimate; refuse before training when it exceeds the device (trainer.memory_check)."""
    topo_world = topology(cfg).world_size if cfg.trainer.distributed != "none" else 1
    per_node = processes_per_node(cfg) if cfg.trainer.distributed != "none" else 1
    estimate = estimate_memory(cfg, model_path, topo_world)
    capacity, device_name = device_capacity_gib(cfg, per_node)
    estimate["device_gib"] = round(capacity, 2)
    summary = ", ".join(f"{k} {estimate[k]:.2f}" for k in ("weights", "gradients", "optimizer", "activations"))
    log.info("train memory estimate per device: %.2f GiB (%s) of %.1f GiB %s; %s, %d of %d parameters trainable",
             estimate["total"], summary, capacity, device_name, cfg.trainer.distributed, estimate["trainable_parameters"],
             estimate["parameters"])
    if cfg.trainer.memory_check and estimate["total"] > capacity:
        raise SelfplayError(
            f"train: estimated peak {estimate['total']:.1f} GiB per device ({summary} GiB) exceeds the "
            f"{capacity:.1f} GiB of {device_name}. Try trainer.gradient_checkpointing=true, trainer.peft=lora, "
            f"trainer.distributed=fsdp (shards weights, gradients and optimizer over the ranks), a smaller "
            f"trainer.batch_size with more trainer.gradient_accumulation_steps, or trainer.memory_check=false to "
            f"try anyway.")
    return estimate
