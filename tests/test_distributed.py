"""Training at scale (selfplay/training/distributed.py): DDP over 2 gloo processes equals one process, LoRA merges into a
plain policy, the FSDP and DeepSpeed configs compose into real accelerate launches, and a run that cannot fit is
refused before training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_cli, tiny_overrides
from safetensors.torch import load_file

from selfplay.runner.slurm import compose
from selfplay.training.distributed import Topology, accelerate_config, estimate_memory, launch_command

# 8 selected pairs: one optimizer step of a global batch of 8, whether 1 process × 8 or 2 processes × 4.
DATA = ["rounds=1", "prompts.per_round=12", "selection.top_k=8", "trainer.learning_rate=1e-3"]


@pytest.fixture(scope="module")
def selected_round(tmp_path_factory, tiny_policy):
    """Round 0 up to `select` at a precision, run once per precision; each test trains on a copy. (A train stage
    refuses to run on stages that finished under another precision, as a whole run would.)"""
    made = {}

    def base(precision: str = "fp32"):
        if precision not in made:
            root = tmp_path_factory.mktemp(f"dist-{precision}")
            overrides = [*tiny_overrides(root, tiny_policy, None, "base"), *DATA, f"precision={precision}"]
            out = run_cli("stage", "prompts,generate,score,pair,margin,select", "round=0", *overrides)
            assert out.returncode == 0, out.stderr[-3000:]
            made[precision] = (root, overrides)
        return made[precision]
    return base


def train_copy(selected_round, name: str, *extra: str, precision: str = "fp32"):
    root, overrides = selected_round(precision)
    shutil.copytree(root / "base", root / name)
    out = run_cli("stage", "train", "round=0", *overrides, f"run_name={name}", *extra)
    return out, root / name / "round_00"


# DDP vs one process, compared where the comparison means something: the gradient. One step of plain SGD makes each
# weight's update −lr·g, so the two runs' updates differ by lr times the difference of their gradients: 2 processes ×
# 4 pairs all-reduced by gloo vs 1 process × 8 pairs, whose sums are ordered differently and whose matrix kernels
# block the batches differently. (Under Adam an element whose gradient is near zero moves by ≈ ±lr whatever its size,
# so the same rounding can move one weight by up to 2·lr: a bound on Adam's weights tuned on one processor's rounding
# failed on another's, 2.4e-6 against 1e-6.)
#
# Per tensor:  ‖Δ_ddp − Δ_single‖ ≤ K·u·‖Δ_single‖ + ‖ulp(w)‖
#   u        unit roundoff of the arithmetic: fp32 2⁻²⁴ ≈ 6e-8; bf16 autocast 2⁻⁸ ≈ 3.9e-3 (each matmul's output);
#   K = 16   rounding steps that accumulate through forward and backward (with room for other kernels);
#   ulp(w)   storing w + Δ in fp32 rounds it, and two updates a hair apart can round to neighbouring floats: one ulp of
#            the weight per element (it dominates where the update is tiny against the weight, e.g. q/k projections).
# Measured 2026-12-01 (AMD EPYC, AVX512-BF16): fp32 differences are all within the ulp term alone; bf16's worst
# tensor ratio is 0.8·u; the worst tensors reach 0.39 (fp32) and 0.10 (bf16) of their bounds with K = 8, 0.2 and
# 0.05 with K = 16. The test prints the worst tensor.
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8}
ROUNDING_STEPS = 16
SGD = ["trainer.optim=sgd", "trainer.lr_scheduler_type=constant", "trainer.warmup_ratio=0", "trainer.learning_rate=0.5",
       "trainer.epochs=1"]


def ulp(weights: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(weights, torch.full_like(weights, float("inf"))) - weights


def assert_ddp_update_matches(ddp_policy, single_policy, base_policy, precision: str, label: str) -> None:
    """Each tensor's DDP update within the bound above of the single process's (the worst tensor is printed)."""
    ours, theirs = load_file(ddp_policy / "model.safetensors"), load_file(single_policy / "model.safetensors")
    base = load_file(base_policy / "model.safetensors")
    assert ours.keys() == theirs.keys()
    u = UNIT_ROUNDOFF[precision]
    excess = {}  # how far each tensor's difference is from its bound, as a fraction of the bound (≤ 1 passes)
    for key in theirs:
        update = (theirs[key] - base[key]).double()
        if update.norm() == 0:  # no gradient reached it: DDP must not move it either
            assert torch.equal(ours[key], base[key]), key
            continue
        bound = ROUNDING_STEPS * u * update.norm() + ulp(theirs[key]).double().norm()
        excess[key] = ((ours[key] - theirs[key]).double().norm() / bound).item()
    worst = max(excess, key=excess.get)
    relative = ((ours[worst] - theirs[worst]).double().norm() / (theirs[worst] - base[worst]).double().norm()).item()
    print(f"{label} vs single process ({precision}): worst tensor {worst}: {excess[worst]:.3f} of its bound "
          f"(‖Δddp − Δsingle‖/‖Δsingle‖ = {relative:.3g} = {relative / u:.3g}·u) over {len(excess)} tensors")
    assert len(excess) > len(theirs) // 2  # the step moved most tensors
    assert excess[worst] <= 1.0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ddp_on_two_gloo_processes_matches_one_process(selected_round, tiny_policy, precision):
    single, single_dir = train_copy(selected_round, f"single-{precision}", "trainer.batch_size=8", *SGD,
                                    precision=precision)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp, ddp_dir = train_copy(selected_round, f"ddp-{precision}", "trainer.batch_size=4", "trainer.distributed=ddp",
                              "trainer.num_processes=2", *SGD, precision=precision)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "train: ddp on 1 node(s) × 2 process(es)" in ddp.stderr
    stats = json.loads((ddp_dir / "train.done.json").read_text())["stats"]
    assert stats["world_size"] == 2 and stats["steps"] == 1 and stats["pairs"] == 8
    assert_ddp_update_matches(ddp_dir / "policy", single_dir / "policy", tiny_policy, precision, "ddp")


def test_lora_is_merged_into_a_plain_policy(selected_round, tiny_policy):
    out, rdir = train_copy(selected_round, "lora", "trainer.peft=lora", "trainer.lora_r=4", "trainer.lora_alpha=8")
    assert out.returncode == 0, out.stderr[-3000:]
    policy = rdir / "policy"
    assert not list(policy.glob("adapter_*")), "the saved policy must be a plain model"
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(policy, use_safetensors=True)  # plain transformers, no peft
    base = load_file(tiny_policy / "model.safetensors")
    state = merged.state_dict()
    changed = [k for k in base if not torch.equal(base[k], state[k])]
    assert changed and all("proj" in k for k in changed), changed[:5]  # only the adapted linear layers moved


@pytest.mark.vllm
def test_lora_merged_policy_loads_in_vllm(tmp_path, vllm_policy):
    overrides = [*tiny_overrides(tmp_path, vllm_policy, None, "lora_vllm"), *DATA, "trainer.peft=lora",
                 "trainer.lora_r=4"]
    out = run_cli("run", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    # In a child process: a Ray driver in the pytest process would die with any later `ray stop` (and pytest with it).
    policy = tmp_path / "lora_vllm" / "round_00" / "policy"
    code = (
        "import sys, torch\n"
        "from selfplay.runner.slurm import compose\n"
        "from selfplay.backends.samplers import SamplingSpec\n"
        "from selfplay.backends.samplers.vllm import VLLMSampler\n"
        "cfg = compose(['sampler=vllm', 'sampler.batch_size=2', 'device=cpu'])\n"
        "sampler = VLLMSampler(sys.argv[1], 'float32', torch.device('cpu'), sampler_cfg=cfg.sampler, ray_cfg=cfg.ray)\n"
        "out = sampler(['Say hi.'], SamplingSpec(n=1, max_new_tokens=4, greedy=True))\n"
        "print('generated', len(out), out[0].n_tokens)\n")
    loaded = subprocess.run([sys.executable, "-c", code, str(policy)], capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    generated = loaded.stdout.split("generated")[-1].split()
    assert generated[0] == "1" and int(generated[1]) >= 1


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero3", "ddp"])
def test_strategy_configs_compose_into_an_accelerate_launch(strategy):
    """The committed accelerate config files and the command selfplay builds parse and validate as accelerate's own
    `accelerate launch` would, for a 2-node × 8-GPU allocation (no GPU needed: nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cfg = compose([f"trainer.distributed={strategy}", "precision=bf16", "trainer.gradient_accumulation_steps=4"])
    command = launch_command(cfg, Topology(nodes=2, per_node=8, main_address="node-a", main_port=29512),
                             ["CONFIG", "RUN", "0", "OUT"], machine_rank="1")
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(command[3:])
    args, defaults, _ = _validate_launch_command(args)
    assert args.config_file == str(accelerate_config(strategy))
    assert (args.num_processes, args.num_machines, args.machine_rank) == (16, 2, 1)
    assert args.main_process_ip == "node-a" and args.mixed_precision == "bf16"
    assert args.module and args.training_script == "selfplay.train_worker"
    if strategy == "fsdp":
        assert args.use_fsdp and str(args.fsdp_version) == "2"
        assert args.fsdp_state_dict_type == "FULL_STATE_DICT"  # the saved policy is one full state dict
    elif strategy == "deepspeed_zero3":
        assert args.use_deepspeed and int(args.zero_stage) == 3 and args.zero3_save_16bit_model in (True, "true")
        assert int(args.gradient_accumulation_steps) == 4
    else:
        assert args.multi_gpu


def test_memory_estimate_scales_with_sharding_and_refuses_what_cannot_fit(tmp_path, tiny_policy):
    cfg = compose([f"model.path={tiny_policy}", "trainer.distributed=fsdp"])
    full = estimate_memory(compose([f"model.path={tiny_policy}", "trainer.distributed=ddp"]), tiny_policy, 8)
    sharded = estimate_memory(cfg, tiny_policy, 8)
    assert sharded["weights"] == pytest.approx(full["weights"] / 8, rel=0.01)
    assert sharded["optimizer"] == pytest.approx(full["optimizer"] / 8, rel=0.01)
    lora = estimate_memory(compose([f"model.path={tiny_policy}", "trainer.peft=lora", "trainer.lora_r=4"]), tiny_policy, 1)
    assert lora["trainable_parameters"] < full["trainable_parameters"] / 10
    # A batch no machine holds: refused at the train stage, before training, naming what to change.
    out = run_cli("run", *tiny_overrides(tmp_path, tiny_policy, None, "huge"), "rounds=1", "trainer.batch_size=100000",
                  "trainer.max_length=4096")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "train: estimated peak" in out.stderr and "trainer.gradient_checkpointing=true" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "huge" / "round_00" / "policy").exists()


def test_a_failing_rank_fails_the_stage_with_its_error(tmp_path, tiny_policy):
    """Every rank fails to load a policy whose chat template was removed after the data stages: the stage exits 2
    with that error, not a torchrun traceback, and writes no policy."""
    policy = tmp_path / "policy"
    shutil.copytree(tiny_policy, policy)
    overrides = [*tiny_overrides(tmp_path, policy, None, "broken"), *DATA, "trainer.batch_size=2",
                 "trainer.distributed=ddp", "trainer.num_processes=2"]
    out = run_cli("stage", "prompts,generate,score,pair,margin,select", "round=0", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    (policy / "chat_template.jinja").unlink()
    out = run_cli("stage", "train", "round=0", *overrides)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "train: a rank failed" in out.stderr and "has no chat template" in out.stderr
    assert (tmp_path / "broken" / "round_00" / "train.ranks.log").exists()
    assert not (tmp_path / "broken" / "round_00" / "policy").exists()
