"""Fence, part 1: TRL's private functions, each behind a selfplay function. Nothing else in selfplay imports
trl.data_utils' underscored names or trl.trainer.utils (tests/test_architecture.py), and no module outside the
fence touches another library's private names (tests/test_fence.py). Part 2, the trainer subclasses and the model
patches, is selfplay/backends/trl_trainers.py.

    name (TRL 1.16, pinned trl<1.17)        used for
    trl.data_utils._tokenize                the chat-template tokenization DPOTrainer applies (sampler and
                                            margins must see the trainer's exact token ids)
    trl.data_utils.common_prefix_length     where DPOTrainer splits prompt from completion
    trl.trainer.utils.add_fused_lm_head     TRL's fused head for models with logit scaling or soft-capping
                                            (replaces the model's forward; add_fused_lm_head marks the model
                                            with `_selfplay_fused_head` so that it is added once)
    trl.trainer.utils.FusedCausalLMOutput   the output type TRL's loss reads from a fused head
    CPOTrainer.tokenize_row,                CPO's tokenization of one row, run on a namespace standing in for
    CPOTrainer.build_tokenized_answer       a trainer (it reads processing_class, is_encoder_decoder,
                                            max_length and build_tokenized_answer only): cpo_tokenize_row

TRL's main branch has dropped or moved the first two and the fused head; an upgrade starts here
(tests/test_trl_equivalence.py checks every one against the installed TRL).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

FUSED_HEAD_MARK = "_selfplay_fused_head"  # set on a model once TRL's fused head replaced its forward


def tokenize(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    from trl.data_utils import _tokenize

    return list(_tokenize(tokenizer, messages, add_generation_prompt=add_generation_prompt)["input_ids"])


def common_prefix_length(a: list[int], b: list[int]) -> int:
    from trl.data_utils import common_prefix_length as trl_common_prefix_length

    return trl_common_prefix_length(a, b)


def add_fused_lm_head(model: Any) -> None:
    """TRL's fused LM head on `model` (its forward then takes `fused_lm_head=True`); a second call changes nothing."""
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    if getattr(model, FUSED_HEAD_MARK, False):
        return
    trl_add_fused_lm_head(model)
    setattr(model, FUSED_HEAD_MARK, True)


def fused_output_type() -> type:
    from trl.trainer.utils import FusedCausalLMOutput

    return FusedCausalLMOutput


def cpo_tokenize_row(tokenizer: Any, row: dict, max_length: int) -> dict:
    """CPOTrainer's tokenization of one chat-templated row (BOS/EOS handling, truncation), without a trainer: its
    methods read only these attributes, so TRL's code runs unchanged on a namespace."""
    from trl.experimental.cpo import CPOTrainer

    trainer = SimpleNamespace(processing_class=tokenizer, is_encoder_decoder=False, max_length=max_length)
    trainer.build_tokenized_answer = functools.partial(CPOTrainer.build_tokenized_answer, trainer)
    return CPOTrainer.tokenize_row(trainer, row)
