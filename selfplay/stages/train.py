"""train — one preference-optimisation pass from π_r on the round's selected pairs, giving π_{r+1}.

Input:   round_XX/selected.parquet; π_r
Output:  round_XX/policy/   π_{r+1}: model.safetensors, config, tokenizer with its chat template
Objectives (trainer.objective):
  dpo    TRL's DPOTrainer, reference = π_r (or model.reference). The reference log-probs are the margin stage's
         teacher-forced sums over the same token ids, so no reference model is loaded or run here.
  simpo  TRL's CPOTrainer with loss_type=simpo, cpo_alpha=0 (reference-free, length-normalised, margin γ).
  mmpo   MMPO (arXiv 2410.03145): −p·log σ(βh) − (1−p)·log σ(−βh) with a soft label p = σ(γ_m·Δex) per pair, on the
         logit h of DPO (reference log-probs reused as above) or SimPO (trainer.mmpo_logits); p = 1 is plain DPO/SimPO.
         The loss is selfplay/core/losses.py; the TRL trainer subclasses are selfplay/backends/trl_trainers.py (the
         fence around TRL's non-public API).
Logging: logger=tensorboard|wandb passes the trainer's own metrics (loss, rewards, margins per step) through TRL's
         report_to into the run's tracker (selfplay/reports/tracking.py); logger=none reports nowhere.
Scale:   trainer.distributed=ddp|fsdp|deepspeed_zero3 runs it through `accelerate launch` on every GPU of the
         node(s), trainer.peft=lora trains adapters merged into the saved policy, and the estimated peak memory per
         device is printed (and checked) first — see selfplay/training/distributed.py.
Alone:   selfplay stage train round=R
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from selfplay.backends.chat import template_sha256
from selfplay.backends.modeling import (
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    safetensors_index,
    torch_device,
)
from selfplay.backends.precision import train_bf16
from selfplay.backends.trl_trainers import dpo_trainer_class, mmpo_cpo_trainer_class, mmpo_dpo_trainer_class
from selfplay.core.losses import soft_labels
from selfplay.errors import NoPairsError, UnchangedPolicyError
from selfplay.reports.tracking import trainer_report_to
from selfplay.rundir import faults, preemption, tables
from selfplay.rundir.checkpoints import last_trainer_checkpoint
from selfplay.rundir.layout import round_name
from selfplay.stages.base import StageContext
from selfplay.training.distributed import lora_config, plan_memory, run_distributed, topology

log = logging.getLogger("selfplay")

OUTPUTS = ("policy",)
CONFIG = ("trainer", "model.reference", "model.dtype", "model.trust_remote_code", "seed", "precision")


def requires(r: int, cfg=None) -> list[tuple[int, str]]:
    return [(r, "select")] + ([(r - 1, "train")] if r > 0 else [])


def reference_logps(selected: pd.DataFrame, has_reference_model: bool) -> tuple[list[float], list[float]]:
    """DPO reference log-prob sums per pair: π_ref's when a reference model is configured, else π_r's own."""
    prefix = "ref_logp" if has_reference_model else "logp"
    return selected[f"{prefix}_chosen_sum"].tolist(), selected[f"{prefix}_rejected_sum"].tolist()


def optimizer_steps(cfg, num_pairs: int, world_size: int = 1) -> int:
    """Optimizer steps of a round, as the Trainer counts them: ceil(micro-batches / accumulation) per epoch."""
    t = cfg.trainer
    micro_batches = math.ceil(num_pairs / (t.batch_size * world_size))
    return math.ceil(micro_batches / t.gradient_accumulation_steps) * t.epochs


def warmup_steps(cfg, num_pairs: int, world_size: int = 1) -> int:
    """trainer.warmup_ratio as whole steps, rounded down and always short of the last step. Transformers rounds the
    fraction up, so a 10% warm-up made a 1–9-step round's first step (a one-step round's only step) run at lr 0."""
    steps = optimizer_steps(cfg, num_pairs, world_size)
    return max(0, min(int(cfg.trainer.warmup_ratio * steps), steps - 1))


def common_args(cfg, output_dir: str, report_to: str | list[str] = "none", num_pairs: int = 0) -> dict:
    t = cfg.trainer
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        optim=t.optim,
        warmup_steps=warmup_steps(cfg, num_pairs, int(os.environ.get("WORLD_SIZE", "1"))),
        beta=t.beta,
        max_length=t.max_length,
        bf16=train_bf16(cfg),  # accelerate's autocast; the weights and AdamW's state stay in model.dtype
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        # Resumable checkpoints (selfplay/rundir/checkpoints.py): the newest one only, with optimizer, scheduler and RNG.
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=1,
        report_to=report_to,  # logger=tensorboard|wandb: the trainer's own metrics (tracking.trainer_report_to)
        use_cpu=torch_device(cfg.device).type == "cpu",  # device=auto on a machine without a GPU too
        dataloader_num_workers=0,
        dataloader_pin_memory=torch_device(cfg.device).type == "cuda",  # pinning only helps host-to-GPU copies
    )


def build_trainer(cfg, model, tokenizer, selected: pd.DataFrame, output_dir: str,
                  report_to: str | list[str] = "none", share_prompt: bool = True, eager_attention: bool = False):
    """The round's TRL trainer. `share_prompt=False` runs each pair as two rows on a CPU too (the benchmark's
    baseline; the log-probs are the same up to rounding)."""
    t = cfg.trainer
    columns = {"prompt": selected["prompt"].tolist(), "chosen": selected["chosen"].tolist(),
               "rejected": selected["rejected"].tolist()}
    from datasets import Dataset

    peft = lora_config(cfg) if t.peft == "lora" else None
    mmpo = t.objective == "mmpo"
    if mmpo:
        columns["soft_label"] = soft_labels(selected["margin_explicit"], t.gamma).tolist()
    if t.objective == "simpo" or (mmpo and t.mmpo_logits == "simpo"):
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common_args(cfg, output_dir, report_to, len(selected)), loss_type="simpo", cpo_alpha=0.0,
                         simpo_gamma=t.simpo_gamma if mmpo else t.gamma)
        trainer_class = mmpo_cpo_trainer_class() if mmpo else CPOTrainer
        return trainer_class(model=model, args=args, train_dataset=Dataset.from_dict(columns),
                             processing_class=tokenizer, peft_config=peft)

    from trl import DPOConfig

    reuse = t.reuse_reference_logps
    if reuse:
        columns["ref_chosen_logps"], columns["ref_rejected_logps"] = reference_logps(selected, bool(cfg.model.reference))
    ref_model = None
    if not reuse and cfg.model.reference:
        ref_model = load_causal_lm(resolve_model_path(cfg.model.reference), cfg.model.dtype, model.device,
                                   cfg.model.trust_remote_code)
    # MMPO reads the reference log-probs from the batch: without reuse, TRL precomputes them from the same reference.
    args = DPOConfig(**common_args(cfg, output_dir, report_to, len(selected)), precompute_ref_log_probs=reuse or mmpo)
    trainer_class = (mmpo_dpo_trainer_class if mmpo else dpo_trainer_class)(share_prompt, eager_attention)
    return trainer_class(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_dict(columns),
                         processing_class=tokenizer, peft_config=peft)


# The two callbacks subclass transformers' TrainerCallback, its documented extension point, and override only its
# public on_* events, so they stay here, outside the fence (tests/test_fence.py: PUBLIC_BASES).
def _fault_points(round_name: str):
    """A TrainerCallback that marks each optimizer step and each saved checkpoint for the fault suite."""
    from transformers import TrainerCallback

    class FaultPoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            faults.point(faults.stage_label(round_name, "train", "step"))

        def on_save(self, args, state, control, **kwargs):
            faults.point(faults.stage_label(round_name, "train", "checkpoint"))

    return FaultPoints()


def _stop_on_preemption():
    """A TrainerCallback that, once the job is told to stop (selfplay/rundir/preemption.py), saves a checkpoint at
    the end of the step in hand and ends training there; every rank stops at the same step."""
    from transformers import TrainerCallback

    class StopOnPreemption(TrainerCallback):
        stopped_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < state.max_steps and preemption.agreed():
                control.should_save = control.should_training_stop = True
                self.stopped_at = state.global_step

    return StopOnPreemption()


def train_policy(cfg, run_dir: Path, r: int, out: Path, checkpoint_dir: Path) -> dict | None:
    """Train π_{r+1} from π_r on round r's selected pairs into out/policy; returns the stats on the main process
    (None on the other ranks of a distributed run). The single-process stage and every distributed rank run this.
    Checkpoints go to checkpoint_dir; training resumes from the newest complete one there."""
    ctx = StageContext(cfg=cfg, run_dir=run_dir, round=r, out=out)
    resume = last_trainer_checkpoint(checkpoint_dir)
    selected = ctx.read_parquet("selected.parquet")
    policy = ctx.policy_path()
    tokenizer = load_tokenizer(policy, cfg.model.trust_remote_code)
    # Under accelerate the Trainer places the model on its rank's device itself.
    device = "cpu" if cfg.trainer.distributed != "none" else ctx.device
    model = load_causal_lm(policy, cfg.model.dtype, device, cfg.model.trust_remote_code)
    model.train()
    # Logging observes training and changes nothing in it: the same weights with any logger. Only the main rank
    # of a distributed run reports (and prepares the log directory).
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with trainer_report_to(cfg, run_dir, r) if main_rank else nullcontext("none") as report_to:
        trainer = build_trainer(cfg, model, tokenizer, selected, str(checkpoint_dir), report_to)
        trainer.add_callback(_fault_points(ctx.round_dir.name))
        stop = _stop_on_preemption()
        trainer.add_callback(stop)
        if resume is not None:
            log.info("round %d train: resuming from %s", r, resume)
        with preemption.safe_points():  # a stop signal ends training at the next optimizer step, checkpointed
            result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    if stop.stopped_at is not None:
        raise preemption.Preempted(f"round {r} train: stopped at optimizer step {stop.stopped_at} of "
                                   f"{trainer.state.max_steps}, checkpointed in {checkpoint_dir}; the same command "
                                   "resumes from there")
    if cfg.trainer.peft == "lora":
        trainer.save_model(str(out / "adapter"))  # every rank takes part (sharded strategies gather the adapter)
    else:
        trainer.model.config.use_cache = True  # the Trainer turns the KV cache off; the next round samples with it
        trainer.save_model(str(out / "policy"))
    if not trainer.is_world_process_zero():
        return None
    if cfg.trainer.peft == "lora":
        merge_adapter(policy, out / "adapter", out / "policy", cfg)
    tokenizer.save_pretrained(str(out / "policy"))
    # The Trainer also pickles its arguments there; the next round never unpickles anything, so leave it out.
    (out / "policy" / "training_args.bin").unlink(missing_ok=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    world = trainer.args.world_size
    per_step = cfg.trainer.batch_size * cfg.trainer.gradient_accumulation_steps * world
    return dict(pairs=len(selected), steps=trainer.state.global_step, steps_per_epoch=math.ceil(len(selected) / per_step),
                first_loss=round(losses[0], 5) if losses else None, final_loss=round(losses[-1], 5) if losses else None,
                train_seconds=round(result.metrics.get("train_runtime", 0.0), 2), objective=cfg.trainer.objective,
                resumed_from_step=int(resume.name.rsplit("-", 1)[-1]) if resume is not None else None,
                distributed=cfg.trainer.distributed, world_size=world, peft=cfg.trainer.peft,
                mean_soft_label=round(float(soft_labels(selected["margin_explicit"], cfg.trainer.gamma).mean()), 4)
                if cfg.trainer.objective == "mmpo" else None,
                chat_template_sha256=template_sha256(tokenizer))


def merge_adapter(base: Path, adapter: Path, target: Path, cfg) -> None:
    """Base weights + LoRA adapter → one plain model (safetensors) that transformers and vLLM load as-is."""
    from peft import PeftModel

    model = load_causal_lm(base, cfg.model.dtype, "cpu", cfg.model.trust_remote_code)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(str(target), safe_serialization=True)


def changed_tensor(before: Path, after: Path) -> str | None:
    """The name of a tensor that differs between two saved models (safetensors, any sharding), or None when every
    tensor they share is equal bit for bit. Training changes nearly every tensor, so this usually reads one."""
    import torch
    from safetensors import safe_open

    old, new = safetensors_index(before), safetensors_index(after)
    for name in [n for n in new if n in old]:
        with safe_open(str(old[name][0]), framework="pt") as a, safe_open(str(new[name][0]), framework="pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        if x.dtype != y.dtype:  # e.g. bf16 weights on disk trained as model.dtype=float32: compare the values
            x, y = x.float(), y.float()
        if x.shape != y.shape or not torch.equal(x, y):
            return name
    return None


def run(ctx) -> None:
    cfg = ctx.cfg
    n_selected = tables.count_rows(ctx.path("selected.parquet"))
    if n_selected == 0:
        raise NoPairsError(
            f"round {ctx.round}: no preference pairs to train on (every prompt's samples tied, see "
            f"{round_name(ctx.round)}/pair.done.json). Raise sampler.n or sampler.temperature, add prompts "
            f"(prompts.per_round), or check that the reward separates responses."
        )
    memory = plan_memory(cfg, ctx.policy_path())
    if cfg.trainer.distributed == "none" or (cfg.trainer.distributed == "ddp" and topology(cfg).world_size == 1):
        stats = train_policy(cfg, ctx.run_dir, ctx.round, ctx.out, ctx.checkpoint_dir)  # DDP over 1 process
    else:
        # The ranks read the same resolved config this process runs with.
        config_path = ctx.out / "config.yaml"
        config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        # The ranks' output stays beside the round (the temp dir goes when the stage fails).
        last_trainer_checkpoint(ctx.checkpoint_dir)  # drop a checkpoint cut short by a kill before the ranks look
        run_distributed(cfg, [str(config_path), str(ctx.run_dir), str(ctx.round), str(ctx.out),
                              str(ctx.checkpoint_dir)],
                        ctx.round_dir / "train.ranks.log")
        stats = json.loads((ctx.out / "stats.json").read_text())
        for scratch in ("config.yaml", "stats.json"):
            (ctx.out / scratch).unlink()
    changed = changed_tensor(ctx.policy_path(), ctx.out / "policy")
    if changed is None:
        raise UnchangedPolicyError(
            f"round {ctx.round} train: the trained policy equals π_{ctx.round} in every weight after "
            f"{stats['steps']} optimizer step(s) at trainer.learning_rate={cfg.trainer.learning_rate} "
            f"(warm-up {warmup_steps(cfg, n_selected, stats['world_size'])} step(s)): nothing was learnt, so the "
            "stage fails instead of passing the same policy on. Raise trainer.learning_rate, or give the round more "
            "pairs (prompts.per_round, selection.ratio)")
    ctx.stats.update(stats, memory_estimate_gib=round(memory["total"], 3), first_changed_tensor=changed)
