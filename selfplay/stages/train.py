"""train — one preference-optimisation pass from π_r on the round's selected pairs, giving π_{r+1}.

Input:   round_XX/selected.parquet; π_r
Output:  round_XX/policy/   π_{r+1}: model.safetensors, config, tokenizer with its chat template
Objectives (trainer.objective):
  dpo    TRL's DPOTrainer, reference = π_r (or model.reference). The reference log-probs are the margin stage's
         teacher-forced sums over the same token ids, so no reference model is loaded or run here.
  simpo  TRL's CPOTrainer with loss_type=simpo, cpo_alpha=0 (reference-free, length-normalised, margin γ).
Logging: logger=tensorboard|wandb passes the trainer's own metrics (loss, rewards, margins per step) through TRL's
         report_to into the run's tracker (selfplay/tracking.py); logger=none reports nowhere.
Scale:   trainer.distributed=ddp|fsdp|deepspeed_zero3 runs it through `accelerate launch` on every GPU of the
         node(s), trainer.peft=lora trains adapters merged into the saved policy, and the estimated peak memory per
         device is printed (and checked) first — see selfplay/distributed.py.
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

from .. import faults
from ..chat import template_sha256
from ..checkpoints import last_trainer_checkpoint
from ..distributed import lora_config, plan_memory, run_distributed, topology
from ..errors import NoPairsError
from ..modeling import load_causal_lm, load_tokenizer, torch_device
from ..tracking import trainer_report_to

log = logging.getLogger("selfplay")

OUTPUTS = ("policy",)
CONFIG = ("trainer", "model.reference", "model.dtype", "model.trust_remote_code", "seed")


def requires(r: int) -> list[tuple[int, str]]:
    return [(r, "select")] + ([(r - 1, "train")] if r > 0 else [])


def reference_logps(selected: pd.DataFrame, has_reference_model: bool) -> tuple[list[float], list[float]]:
    """DPO reference log-prob sums per pair: π_ref's when a reference model is configured, else π_r's own."""
    prefix = "ref_logp" if has_reference_model else "logp"
    return selected[f"{prefix}_chosen_sum"].tolist(), selected[f"{prefix}_rejected_sum"].tolist()


def _dpo_trainer_class():
    from trl import DPOTrainer

    class PrecomputedReferenceDPOTrainer(DPOTrainer):
        """DPOTrainer that keeps `ref_chosen_logps`/`ref_rejected_logps` columns already in the dataset instead of
        recomputing them with a reference forward pass (TRL would compute the same numbers)."""

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names):
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

    return PrecomputedReferenceDPOTrainer


def common_args(cfg, output_dir: str, report_to: str | list[str] = "none") -> dict:
    t = cfg.trainer
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a fraction of the steps in transformers 5
        beta=t.beta,
        max_length=t.max_length,
        bf16=t.bf16,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        # Resumable checkpoints (selfplay/checkpoints.py): the newest one only, with optimizer, scheduler and RNG.
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=1,
        report_to=report_to,  # logger=tensorboard|wandb: the trainer's own metrics (tracking.trainer_report_to)
        use_cpu=str(cfg.device) == "cpu",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch_device(cfg.device).type == "cuda",  # pinning only helps host-to-GPU copies
    )


def build_trainer(cfg, model, tokenizer, selected: pd.DataFrame, output_dir: str,
                  report_to: str | list[str] = "none"):
    t = cfg.trainer
    columns = {"prompt": selected["prompt"].tolist(), "chosen": selected["chosen"].tolist(),
               "rejected": selected["rejected"].tolist()}
    from datasets import Dataset

    peft = lora_config(cfg) if t.peft == "lora" else None
    if t.objective == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common_args(cfg, output_dir, report_to), loss_type="simpo", cpo_alpha=0.0,
                         simpo_gamma=t.gamma)
        return CPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(columns), processing_class=tokenizer,
                          peft_config=peft)

    from trl import DPOConfig

    reuse = t.reuse_reference_logps
    if reuse:
        columns["ref_chosen_logps"], columns["ref_rejected_logps"] = reference_logps(selected, bool(cfg.model.reference))
    ref_model = None
    if not reuse and cfg.model.reference:
        from ..modeling import resolve_model_path

        ref_model = load_causal_lm(resolve_model_path(cfg.model.reference), cfg.model.dtype, model.device,
                                   cfg.model.trust_remote_code)
    args = DPOConfig(**common_args(cfg, output_dir, report_to), precompute_ref_log_probs=reuse)
    return _dpo_trainer_class()(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_dict(columns),
                                processing_class=tokenizer, peft_config=peft)


def _fault_points(round_name: str):
    """A TrainerCallback that marks each optimizer step and each saved checkpoint for the fault suite."""
    from transformers import TrainerCallback

    class FaultPoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            faults.point(faults.stage_label(round_name, "train", "step"))

        def on_save(self, args, state, control, **kwargs):
            faults.point(faults.stage_label(round_name, "train", "checkpoint"))

    return FaultPoints()


def train_policy(cfg, run_dir: Path, r: int, out: Path, checkpoint_dir: Path) -> dict | None:
    """Train π_{r+1} from π_r on round r's selected pairs into out/policy; returns the stats on the main process
    (None on the other ranks of a distributed run). The single-process stage and every distributed rank run this.
    Checkpoints go to checkpoint_dir; training resumes from the newest complete one there."""
    from ..pipeline import StageContext

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
        if resume is not None:
            log.info("round %d train: resuming from %s", r, resume)
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
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
                chat_template_sha256=template_sha256(tokenizer))


def merge_adapter(base: Path, adapter: Path, target: Path, cfg) -> None:
    """Base weights + LoRA adapter → one plain model (safetensors) that transformers and vLLM load as-is."""
    from peft import PeftModel

    model = load_causal_lm(base, cfg.model.dtype, "cpu", cfg.model.trust_remote_code)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(str(target), safe_serialization=True)


def run(ctx) -> None:
    cfg = ctx.cfg
    selected = ctx.read_parquet("selected.parquet")
    if selected.empty:
        raise NoPairsError(
            f"round {ctx.round}: no preference pairs to train on (every prompt's samples tied, see "
            f"round_{ctx.round:02d}/pair.done.json). Raise sampler.n or sampler.temperature, add prompts "
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
    ctx.stats.update(stats, memory_estimate_gib=round(memory["total"], 3))
