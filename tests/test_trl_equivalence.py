"""The margin stage's tokens and log-probs are the ones TRL's trainers use, so DPO can take them as its reference."""

import pytest
import torch

from selfplay.backends import trl_private
from selfplay.backends.batching import token_budget_batches
from selfplay.backends.chat import prompt_messages, response_messages, training_tokens
from selfplay.backends.logprobs import completion_logps

PAIRS = [
    ("Write a haiku about rain. Use no commas.", "Rain taps the window\nsoft and grey", "no."),
    ("List three fruits in lowercase.", "apple banana cherry", "APPLE, Banana and a very long rambling " * 5),
    ("Say hi.", "hi", "Hello there! How can I help you today?"),
]


def dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [prompt_messages(p) for p, _, _ in PAIRS],
                              "chosen": [response_messages(c) for _, c, _ in PAIRS],
                              "rejected": [response_messages(r) for _, _, r in PAIRS]})


def load(policy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(policy), AutoTokenizer.from_pretrained(policy)


@pytest.mark.parametrize("max_length", [512, 40])
def test_dpo_tokens_and_reference_logps_match_trl(tiny_policy, tmp_path, max_length):
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = load(tiny_policy)
    # bf16=False as in the train stage's default (TRL's own default is bf16 autocast, even on CPU)
    args = DPOConfig(output_dir=str(tmp_path), max_length=max_length, report_to="none", use_cpu=True, bf16=False,
                     per_device_train_batch_size=len(PAIRS), precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset(), processing_class=tokenizer)
    rows = iter(trainer.train_dataset)
    kept, ours = [], []
    for p, c, r in PAIRS:
        pc, cc = training_tokens(tokenizer, p, c, "dpo", max_length)
        pr, cr = training_tokens(tokenizer, p, r, "dpo", max_length)
        if len(pc) >= max_length:  # TRL drops a row whose prompt fills max_length; ours has nothing left to score
            assert cc == [] and cr == []
            continue
        row = next(rows)
        assert pc == row["prompt_ids"] == pr
        # TRL truncates in its collator; ours is already truncated
        room = max_length - len(pc)
        assert cc == row["chosen_ids"][:room] and cr == row["rejected_ids"][:room]
        kept.append(row)
        ours += [(pc, cc), (pr, cr)]
    assert next(rows, None) is None
    assert kept, "the test needs at least one row TRL keeps"
    batches = token_budget_batches([len(p) + len(c) for p, c in ours], 4)
    sums, counts = completion_logps(load(tiny_policy)[0], ours, torch.device("cpu"), batches, tokenizer.pad_token_id)
    # TRL's own reference pass over the same rows (what precompute_ref_log_probs stores); fp32 in both, padded to
    # other widths, so they agree to rounding.
    for i, row in enumerate(kept):
        assert row["ref_chosen_logps"] == pytest.approx(sums[2 * i], rel=1e-6)
        assert row["ref_rejected_logps"] == pytest.approx(sums[2 * i + 1], rel=1e-6)
    assert all(c > 0 for c in counts)


def test_simpo_tokens_match_cpo_trainer(tiny_policy, tmp_path):
    from trl.data_utils import maybe_apply_chat_template
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    model, tokenizer = load(tiny_policy)
    args = CPOConfig(output_dir=str(tmp_path), loss_type="simpo", cpo_alpha=0.0, max_length=64, report_to="none",
                     use_cpu=True)
    rows = CPOTrainer(model=model, args=args, train_dataset=dataset(), processing_class=tokenizer).train_dataset
    for i, (p, c, r) in enumerate(PAIRS):
        for side, text in (("chosen", c), ("rejected", r)):
            prompt_ids, completion_ids = training_tokens(tokenizer, p, text, "simpo", 64)
            assert prompt_ids + completion_ids == rows[i][f"{side}_input_ids"]
            assert rows[i][f"{side}_labels"][len(prompt_ids):] == completion_ids
        # the fence's CPO tokenization on a stand-in trainer is the trainer's own
        row = maybe_apply_chat_template({"prompt": prompt_messages(p), "chosen": response_messages(c),
                                         "rejected": response_messages(r)}, tokenizer)
        batch = trl_private.cpo_tokenize_row(tokenizer, row, 64)
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            assert batch[key] == rows[i][key]
