"""The one fence around TRL names that are not TRL's public API. Everything in selfplay that needs them calls
these functions; nothing else imports from trl.data_utils' underscored names or trl.trainer.utils.

    name (TRL 1.16, pinned trl<1.17)        used for
    trl.data_utils._tokenize                the chat-template tokenization DPOTrainer applies (sampler and
                                            margins must see the trainer's exact token ids)
    trl.data_utils.common_prefix_length     where DPOTrainer splits prompt from completion
    trl.trainer.utils.add_fused_lm_head     TRL's fused head for models with logit scaling or soft-capping
    trl.trainer.utils.FusedCausalLMOutput   the output type TRL's loss reads from a fused head
    DPOTrainer._compute_loss                overridden by the MMPO trainer (selfplay/stages/train.py), which
                                            feeds soft labels to DPO's logits

TRL's main branch has dropped or moved the first two and the fused head; an upgrade starts here
(tests/test_trl_equivalence.py checks every one against the installed TRL).
"""

from __future__ import annotations

from typing import Any


def tokenize(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    from trl.data_utils import _tokenize

    return list(_tokenize(tokenizer, messages, add_generation_prompt=add_generation_prompt)["input_ids"])


def common_prefix_length(a: list[int], b: list[int]) -> int:
    from trl.data_utils import common_prefix_length as trl_common_prefix_length

    return trl_common_prefix_length(a, b)


def add_fused_lm_head(model: Any) -> None:
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    trl_add_fused_lm_head(model)


def fused_output_type() -> type:
    from trl.trainer.utils import FusedCausalLMOutput

    return FusedCausalLMOutput
