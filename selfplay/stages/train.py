"""train — one preference-optimisation pass from π_r on the round's selected pairs, giving π_{r+1}.

Input:   round_XX/selected.parquet; π_r
Output:  round_XX/policy/   π_{r+1}: model.safetensors, config, tokenizer with its chat template
Objectives (trainer.objective):
  dpo    TRL's DPOTrainer, reference = π_r (or model.reference). The reference log-probs are the margin stage's
         teacher-forced sums over the same token ids, so no reference model is loaded or run here.
  simpo  TRL's CPOTrainer with loss_type=simpo, cpo_alpha=0 (reference-free, length-normalised, margin γ).
  mmpo   MMPO (arXiv 2410.03145): −p·log σ(βh) − (1−p)·log σ(−βh) with a soft label p = σ(γ_m·Δex) per pair, on the
         logit h of DPO (reference log-probs reused as above) or SimPO (trainer.mmpo_logits); p = 1 is plain DPO/SimPO.
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

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from selfplay.backends.chat import template_sha256
from selfplay.backends.logprobs import add_label_head
from selfplay.backends.modeling import (
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    safetensors_index,
    torch_device,
)
from selfplay.backends.precision import train_bf16
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


def _dpo_trainer_class():
    from peft import PeftModel
    from trl import DPOTrainer

    def is_peft_model(model) -> bool:
        return isinstance(model, PeftModel)

    class PrecomputedReferenceDPOTrainer(DPOTrainer):
        """DPOTrainer that keeps `ref_chosen_logps`/`ref_rejected_logps` columns already in the dataset instead of
        recomputing them with a reference forward pass (TRL would compute the same numbers). On a CPU the policy's
        LM head runs only at the completion positions (logprobs.add_label_head), as the margin stage's does."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.args.device.type == "cpu" and not is_peft_model(self.model):
                add_label_head(self.model)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names):
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

    return PrecomputedReferenceDPOTrainer


def soft_labels(margin_explicit, gamma: float) -> np.ndarray:
    """MMPO's soft label per pair, p = σ(γ_m·Δex): how sure the judge's reward margin Δex ≥ 0 makes `chosen ≻
    rejected` (½ at a tie, → 1 as the margin grows)."""
    return 1.0 / (1.0 + np.exp(-gamma * np.asarray(margin_explicit, dtype=np.float64)))


def mmpo_loss(logits, soft_label, beta: float):
    """MMPO's loss per pair: the cross-entropy of σ(β·h) against the soft label p, −p·log σ(βh) − (1−p)·log σ(−βh).
    It is the cDPO label-smoothing form with ε = 1 − p; p = 1 gives the plain sigmoid loss of DPO/SimPO."""
    import torch.nn.functional as F

    return -soft_label * F.logsigmoid(beta * logits) - (1 - soft_label) * F.logsigmoid(-beta * logits)


class _SoftLabelCollator:
    """TRL's preference collator plus each pair's `soft_label`, in the batch's row order."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        import torch

        batch = self.collator(examples)
        batch["soft_label"] = torch.tensor([example["soft_label"] for example in examples], dtype=torch.float32)
        return batch


class _FirstOutput:
    """The model, keeping the output of its first call: TRL's forward of the batch, whose log-probs give h."""

    def __init__(self, model):
        self.model, self.outputs = model, None

    def __call__(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        if self.outputs is None:
            self.outputs = outputs
        return outputs

    def __getattr__(self, name):
        return getattr(self.model, name)


def _mmpo_dpo_trainer_class():
    base = _dpo_trainer_class()

    class MMPODPOTrainer(base):
        """MMPO on DPO's logit h = log π(yw)/π_ref(yw) − log π(yl)/π_ref(yl). TRL's _compute_loss runs the forward
        and logs its metrics; the loss is then mmpo_loss on h, from the same forward's log-probs summed as TRL sums
        them. Each pair's `soft_label` travels as a dataset column (kept as a signature column) through the collator
        to the loss; the reference log-probs are always in the batch (the margin stage's, or TRL's precompute)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The loss below stands in for TRL's plain sigmoid loss: nothing else TRL adds to it may be on.
            if not (self.precompute_ref_logps and self.loss_types == ["sigmoid"] and self.ld_alpha is None
                    and self.f_divergence_type == "reverse_kl" and not self.use_weighting):
                raise ValueError("MMPO on DPO logits needs precompute_ref_log_probs and TRL's plain sigmoid loss")
            self.data_collator = _SoftLabelCollator(self.data_collator)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "soft_label" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "soft_label"]

        def compute_ref_log_probs(self, model, inputs):
            return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != "soft_label"})

        def _compute_loss(self, model, inputs, return_outputs):
            soft_label = inputs["soft_label"]
            inputs = {k: v for k, v in inputs.items() if k != "soft_label"}
            forward = _FirstOutput(model)
            result = super()._compute_loss(forward, inputs, return_outputs)
            seq_len = inputs["completion_mask"].size(1) - 1
            logps = forward.outputs.log_probs[:, -seq_len:].sum(dim=1)  # zero off the completion, as TRL sums them
            chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # batch is [chosen, rejected]
            logits = (chosen_logps - inputs["ref_chosen_logps"]) - (rejected_logps - inputs["ref_rejected_logps"])
            loss = mmpo_loss(logits, soft_label.to(logits.device), self.beta).mean()
            if self.aux_loss_enabled:
                loss = loss + self.router_aux_loss_coef * forward.outputs.aux_loss
            return (loss, result[1]) if return_outputs else loss

    return MMPODPOTrainer


def _mmpo_cpo_trainer_class():
    from trl.experimental.cpo import CPOTrainer

    class MMPOCPOTrainer(CPOTrainer):
        """MMPO on SimPO's logit h = mean log π(yw) − mean log π(yl) − γ/β. TRL's SimPO loss is the label-smoothing
        form −(1−ε)·log σ(βh) − ε·log σ(−βh), i.e. mmpo_loss with ε = 1 − p, so each batch sets ε per pair from its
        `soft_label`, which TRL's collator passes through as a list in the batch's row order."""

        def get_batch_loss_metrics(self, model, batch, train_eval="train"):
            import torch

            soft_label = torch.as_tensor(batch["soft_label"], dtype=torch.float32, device=self.accelerator.device)
            self.label_smoothing = 1 - soft_label
            try:
                return super().get_batch_loss_metrics(model, batch, train_eval)
            finally:
                self.label_smoothing = 0.0

    return MMPOCPOTrainer


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
                  report_to: str | list[str] = "none"):
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
        trainer_class = _mmpo_cpo_trainer_class() if mmpo else CPOTrainer
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
    trainer_class = _mmpo_dpo_trainer_class() if mmpo else _dpo_trainer_class()
    return trainer_class(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_dict(columns),
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
