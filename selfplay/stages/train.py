"""train — one preference-optimisation pass from π_r on the round's selected pairs, giving π_{r+1}.

Input:   round_XX/selected.parquet; π_r
Output:  round_XX/policy/   π_{r+1}: model.safetensors, config, tokenizer with its chat template
Objectives (trainer.objective):
  dpo    TRL's DPOTrainer, reference = π_r (or model.reference). The reference log-probs are the margin stage's
         teacher-forced sums over the same token ids, so no reference model is loaded or run here.
  simpo  TRL's CPOTrainer with loss_type=simpo, cpo_alpha=0 (reference-free, length-normalised, margin γ).
Logging: logger=tensorboard|wandb passes the trainer's own metrics (loss, rewards, margins per step) through TRL's
         report_to into the run's tracker (selfplay/tracking.py); logger=none reports nowhere.
Alone:   selfplay stage train round=R
"""

from __future__ import annotations

import logging
import math

import pandas as pd

from ..chat import template_sha256
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
        save_strategy="no",
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

    if t.objective == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common_args(cfg, output_dir, report_to), loss_type="simpo", cpo_alpha=0.0,
                         simpo_gamma=t.gamma)
        return CPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(columns), processing_class=tokenizer)

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
                                processing_class=tokenizer)


def run(ctx) -> None:
    cfg = ctx.cfg
    selected = ctx.read_parquet("selected.parquet")
    if selected.empty:
        raise NoPairsError(
            f"round {ctx.round}: no preference pairs to train on (every prompt's samples tied, see "
            f"round_{ctx.round:02d}/pair.done.json). Raise sampler.n or sampler.temperature, add prompts "
            f"(prompts.per_round), or check that the reward separates responses."
        )
    policy = ctx.policy_path()
    tokenizer = load_tokenizer(policy, cfg.model.trust_remote_code)
    model = load_causal_lm(policy, cfg.model.dtype, ctx.device, cfg.model.trust_remote_code)
    model.train()
    # Logging observes training and changes nothing in it: the same weights with any logger.
    with trainer_report_to(cfg, ctx.run_dir, ctx.round) as report_to:
        trainer = build_trainer(cfg, model, tokenizer, selected, str(ctx.out / "trainer"), report_to)
        result = trainer.train()
    trainer.model.config.use_cache = True  # the Trainer turns the KV cache off; the next round samples with it
    trainer.save_model(str(ctx.out / "policy"))
    tokenizer.save_pretrained(str(ctx.out / "policy"))
    # The Trainer also pickles its arguments there; the next round never unpickles anything, so leave it out.
    (ctx.out / "policy" / "training_args.bin").unlink(missing_ok=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps_per_epoch = math.ceil(len(selected) / (cfg.trainer.batch_size * cfg.trainer.gradient_accumulation_steps))
    ctx.stats.update(pairs=len(selected), steps=trainer.state.global_step, steps_per_epoch=steps_per_epoch,
                     first_loss=round(losses[0], 5) if losses else None,
                     final_loss=round(losses[-1], 5) if losses else None,
                     train_seconds=round(result.metrics.get("train_runtime", 0.0), 2),
                     objective=cfg.trainer.objective, chat_template_sha256=template_sha256(tokenizer))
