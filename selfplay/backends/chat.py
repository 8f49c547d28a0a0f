"""The one place that turns prompts and responses into token ids.

Every stage goes through here so that the sampler, the reward model, the margin stage and the trainer see the
same chat template and truncation. Training tokenization is TRL's own: DPO's (template prompt, template
prompt+completion, split at the common prefix; TRL's functions, behind selfplay/backends/trl_private.py) and,
for SimPO, the CPO trainer's `tokenize_row`. The margin stage's log-probs are therefore over exactly the ids the
trainer will see, which is what lets DPO reuse them as its reference log-probs.
"""

from __future__ import annotations

import hashlib
from typing import Any

from selfplay.backends import trl_private

Messages = list[dict[str, str]]


def template_sha256(tokenizer: Any) -> str:
    """Short hash of the chat template a stage used (recorded in its manifest, shown in the round's card)."""
    return hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:16]


def prompt_messages(prompt: str) -> Messages:
    return [{"role": "user", "content": prompt}]


def response_messages(response: str) -> Messages:
    return [{"role": "assistant", "content": response}]


def generation_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids the policy is sampled from: the chat template with the assistant turn opened."""
    return trl_private.tokenize(tokenizer, prompt_messages(prompt), add_generation_prompt=True)


def reward_input_ids(tokenizer: Any, prompt: str, response: str, max_length: int) -> list[int]:
    """What a sequence-classification reward model reads: the RM's own chat template over the whole conversation,
    cut to max_length (hf_classifier and vllm reward backends alike)."""
    ids = tokenizer.apply_chat_template(prompt_messages(prompt) + response_messages(response), tokenize=True,
                                        return_dict=True)["input_ids"]
    return list(ids[:max_length])


def _dpo_tokens(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    # Mirrors DPOTrainer._prepare_dataset.tokenize_fn for one conversational completion (TRL 1.16).
    prompt_ids = trl_private.tokenize(tokenizer, prompt_messages(prompt), add_generation_prompt=True)
    full_ids = trl_private.tokenize(tokenizer, prompt_messages(prompt) + response_messages(response))
    prompt_len = trl_private.common_prefix_length(prompt_ids, full_ids)
    return list(prompt_ids[:prompt_len]), list(full_ids[prompt_len:])


def _simpo_tokens(tokenizer: Any, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    # CPOTrainer applies the chat template as text, then its own tokenize_row (BOS/EOS handling, truncation).
    from trl.data_utils import maybe_apply_chat_template

    row = maybe_apply_chat_template(
        {"prompt": prompt_messages(prompt), "chosen": response_messages(response), "rejected": response_messages(response)},
        tokenizer,
    )
    batch = trl_private.cpo_tokenize_row(tokenizer, row, max_length)
    prompt_len = sum(1 for label in batch["chosen_labels"] if label == -100)
    ids = list(batch["chosen_input_ids"])
    return ids[:prompt_len], ids[prompt_len:]


def token_format(trainer: Any) -> str:
    """Whose tokenisation the trainer uses: simpo (CPOTrainer) or dpo (DPOTrainer); MMPO follows its logits."""
    return trainer.mmpo_logits if trainer.objective == "mmpo" else trainer.objective


def training_tokens(tokenizer: Any, prompt: str, response: str, objective: str, max_length: int) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) as the TRL trainer for `objective` will see them, after its truncation.

    Truncation is TRL's keep_start over prompt+completion; a completion cut to nothing comes back empty (the
    DPO trainer drops such rows, and the margin stage scores them as missing).
    """
    if objective == "simpo":
        return _simpo_tokens(tokenizer, prompt, response, max_length)
    prompt_ids, completion_ids = _dpo_tokens(tokenizer, prompt, response)
    return prompt_ids, completion_ids[: max(0, max_length - len(prompt_ids))]
