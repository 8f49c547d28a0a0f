"""Fence, part 2: every subclass of a TRL trainer and every patch of a model or trainer object at training time
(part 1, TRL's private functions, is selfplay/backends/trl_private.py). selfplay/stages/train.py builds its
trainers from the classes made here; tests/test_fence.py fails if any other module subclasses a library class,
overrides a private method or touches a private attribute.

    name (TRL 1.16, pinned trl<1.17)            used for
    DPOTrainer._precompute_ref_logps            overridden: keeps the dataset's ref_chosen_logps/ref_rejected_logps
                                                (the margin stage's) instead of a reference forward pass
    DPOTrainer._set_signature_columns_if_needed overridden, and Trainer._signature_columns read and extended: the
                                                `soft_label` column survives the Trainer's column pruning (MMPO)
    DPOTrainer._compute_loss                    overridden and called with _FirstOutput in place of the model: MMPO
                                                reads the log-probs of TRL's forward of the batch (its first call)
    DPOTrainer.compute_ref_log_probs            overridden (public name): the soft labels kept out of its batch
    DPOTrainer.precompute_ref_logps, .loss_types, .ld_alpha, .f_divergence_type, .use_weighting
                                                attributes read (set by __init__, not documented): MMPO stands in
                                                for TRL's plain sigmoid loss only
    DPOTrainer.beta, .aux_loss_enabled, .router_aux_loss_coef
                                                attributes read: the MMPO loss's β and the router loss TRL adds
    Trainer.data_collator                       replaced by _SoftLabelCollator (TRL's collator + soft_label)
    output.log_probs, output.aux_loss           read from TRL's fused-head output (FusedCausalLMOutput)
    CPOTrainer.get_batch_loss_metrics           overridden (trl.experimental, public name): sets ε per batch
    CPOTrainer.label_smoothing                  set to a tensor (ε = 1 − p per pair) for one batch, then back to
                                                0.0: TRL's cpo_loss reads it as a float, and broadcasts a tensor
    model.forward                               replaced by add_label_head (CPU training, plain lm_head models):
                                                TRL's call `model(..., labels=, fused_lm_head=True)` runs the head
                                                at the label positions only and returns TRL's FusedCausalLMOutput
"""

from __future__ import annotations

import types
from typing import Any

from selfplay.backends import trl_private
from selfplay.backends.logprobs import head_logps, pack_shared_prompts, plain_head, shares_prompts
from selfplay.core.losses import mmpo_loss


def add_label_head(model: Any, rows_per_chunk: int = 1024, share_prompt: bool = True,
                   eager_attention: bool = False) -> bool:
    """For training on a CPU: make `model(..., labels=, fused_lm_head=True)` — the call TRL's DPOTrainer makes — run
    the LM head only at the label positions, in chunks recomputed in the backward pass (memory of one chunk's
    logits), and return what TRL's fused head returns (per-token log_probs, entropy, mean_logits, is_top1, zero off
    the labels). TRL's own fused head scores every position, prompt and padding included, when not on a Triton
    device; on 2 cores it was half of a DPO step (bench/results/precision_cpu.md). Returns False (model unchanged)
    where the logits are not plain lm_head(hidden). With `share_prompt` (and a model whose attention is plain
    causal: logprobs.shares_prompts) each pair runs as one row [prompt | chosen | rejected], the prompt computed
    once (logprobs.pack_shared_prompts); the log-probs are the same up to float rounding (tests/test_shared_prompt.py)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    plain = plain_head(model)
    if plain is None:
        return False
    trl_forward = model.forward  # TRL's: the plain forward without fused_lm_head, its fused head otherwise
    sharing = share_prompt and shares_prompts(model)
    if eager_attention:
        model.set_attn_implementation("eager")

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if (not fused_lm_head or shift_labels is not None or kwargs.get("output_router_logits")
                or not bool((labels[:, 1:] != -100).any())):  # TRL keeps an all-masked batch differentiable
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        backbone, head = getattr(self, self.base_model_prefix), self.get_output_embeddings()
        targets = labels[:, 1:]
        mask = targets != -100
        wanted = targets[mask]
        packed = (pack_shared_prompts(kwargs["input_ids"], kwargs["attention_mask"], labels)
                  if sharing and not args and set(kwargs) == {"input_ids", "attention_mask", "use_cache"} else None)
        if packed is None:
            positions = backbone(*args, **kwargs).last_hidden_state[:, :-1][mask]
        else:
            mask4d = packed.additive_mask() if eager_attention else packed.attention_mask  # eager adds its mask
            hidden = backbone(input_ids=packed.input_ids, attention_mask=mask4d,
                              position_ids=packed.position_ids, use_cache=False).last_hidden_state
            positions = hidden[packed.source[:, 0], packed.source[:, 1]]
        parts = [checkpoint(head_logps, head, positions[s : s + rows_per_chunk], wanted[s : s + rows_per_chunk],
                            True, use_reentrant=False) for s in range(0, len(wanted), rows_per_chunk)]
        per_token = [torch.cat([p[k] for p in parts]) if parts else positions.new_zeros(0) for k in range(4)]
        log_probs, entropy, mean_logits, is_top1 = (
            x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return trl_private.fused_output_type()(loss=loss, log_probs=log_probs, entropy=entropy, mean_logits=mean_logits,
                                               is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return True


def dpo_trainer_class(share_prompt: bool = True, eager_attention: bool = False) -> type:
    """TRL's DPOTrainer, taking precomputed reference log-probs from the dataset (PrecomputedReferenceDPOTrainer).
    `share_prompt=False` keeps TRL's two rows per pair on a CPU too (bench/bench_levers.py's baseline)."""
    from peft import PeftModel
    from trl import DPOTrainer

    class PrecomputedReferenceDPOTrainer(DPOTrainer):
        """DPOTrainer that keeps `ref_chosen_logps`/`ref_rejected_logps` columns already in the dataset instead of
        recomputing them with a reference forward pass (TRL would compute the same numbers). On a CPU the policy's
        LM head runs only at the completion positions, and a pair's prompt is computed once (add_label_head)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.args.device.type == "cpu" and not isinstance(self.model, PeftModel):
                add_label_head(self.model, share_prompt=share_prompt, eager_attention=eager_attention)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names):
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

    return PrecomputedReferenceDPOTrainer


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


def mmpo_dpo_trainer_class(share_prompt: bool = True, eager_attention: bool = False) -> type:
    """MMPO on DPO's logits (MMPODPOTrainer), on top of dpo_trainer_class()."""
    base = dpo_trainer_class(share_prompt, eager_attention)

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


def mmpo_cpo_trainer_class() -> type:
    """MMPO on SimPO's logits (MMPOCPOTrainer), on top of TRL's CPOTrainer."""
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
