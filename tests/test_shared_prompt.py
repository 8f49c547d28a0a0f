"""The trainer's shared-prompt rows (backends/logprobs.pack_shared_prompts, used by trl_trainers.add_label_head on a
CPU): one row [prompt | chosen | rejected] per pair gives the log-probs and gradients of TRL's two rows per pair."""

from __future__ import annotations

import copy

import pytest
import torch

from selfplay.backends.logprobs import pack_shared_prompts, shares_prompts
from selfplay.backends.trl_trainers import add_label_head

# fp32: the two layouts add the same terms in another order (other matmul shapes, a masked softmax over more
# columns); each log-prob is a difference of O(10)-sized fp32 numbers through a few layers, so its rounding is
# ~1e-6 (measured below 1e-6 on the tiny policy, ~1e-5 on SmolLM2-135M's 30 layers). bf16 autocast rounds each
# matmul's inputs to 8 bits: per token up to a few hundredths of a nat.
FP32_TOKEN_TOL = 1e-4
BF16_TOKEN_TOL = 0.1


def _batch(tokenizer, pairs):
    """TRL's preference batch of (prompt, chosen, rejected) token lists: rows [chosen…; rejected…], right-padded,
    labels −100 outside the completions."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, : len(p) + len(c)] = 1
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
    return ids, mask, labels


def test_rows_positions_mask_and_sources_by_hand():
    # pair 0: prompt [1 2], chosen [3 4 5], rejected [6]; pair 1: prompt [7], chosen [8], rejected [9 10]
    ids, mask, labels = _batch(type("T", (), {"pad_token_id": 0}),
                               [([1, 2], [3, 4, 5], [6]), ([7], [8], [9, 10])])
    packed = pack_shared_prompts(ids, mask, labels)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 1, 2, 0, 0]]
    # row 0: the rejected token (column 5) sees the prompt (0, 1) and itself, not the chosen tokens (2–4)
    assert packed.attention_mask[0, 0, 5].tolist() == [True, True, False, False, False, True]
    assert packed.attention_mask[0, 0, 4].tolist() == [True, True, True, True, True, False]
    # row 1: rejected [9 10] at columns 2, 3 see the prompt (0) and each other causally; padding sees itself
    assert packed.attention_mask[1, 0, 3].tolist() == [True, False, True, True, False, False]
    assert packed.attention_mask[1, 0, 5].tolist() == [False] * 5 + [True]
    # sources: chosen 3, 4, 5 from columns 1, 2, 3; chosen 8 from 0; rejected 6 from the prompt's end (1);
    # rejected 9 from the prompt's end (0), 10 from 9's column (2)
    assert packed.source.tolist() == [[0, 1], [0, 2], [0, 3], [1, 0], [0, 1], [1, 0], [1, 2]]


def test_batches_not_made_of_shared_prompts_run_as_they_are():
    pad = type("T", (), {"pad_token_id": 0})
    ids, mask, labels = _batch(pad, [([1, 2], [3], [4])])
    ids[1, 1] = 9  # the rejected row's prompt differs from the chosen row's
    assert pack_shared_prompts(ids, mask, labels) is None
    ids, mask, labels = _batch(pad, [([], [3], [4])])  # a completion at position 0: nothing predicts it
    assert pack_shared_prompts(ids, mask, labels) is None
    assert pack_shared_prompts(ids[:1], mask[:1], labels[:1]) is None  # an odd number of rows


def _pairs(tokenizer):
    from selfplay.backends.chat import training_tokens
    from selfplay.rewards.ifeval import build_prompts

    prompts = [row["prompt"] for row in build_prompts(3, seed=5)]
    chosen = ["A plain answer in one sentence, with a list:\n- one\n- two", "Yes.", "SURE, HERE IT IS IN CAPITALS."]
    rejected = ["no", "A longer reply that goes on for a while before it stops, as replies do.", "ok then"]
    return [(*training_tokens(tokenizer, p, c, "dpo", 512), training_tokens(tokenizer, p, r, "dpo", 512)[1])
            for p, c, r in zip(prompts, chosen, rejected, strict=True)]


def _log_probs_and_grads(model, share_prompt, batch, bf16, eager=False):
    model = copy.deepcopy(model)
    assert add_label_head(model, share_prompt=share_prompt, eager_attention=eager)
    ids, mask, labels = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    out.log_probs.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.log_probs.detach(), grads


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_shared_rows_give_the_two_rows_log_probs_and_gradients(tiny_policy, smol_tokenizer, bf16, eager):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    assert shares_prompts(model)
    batch = _batch(smol_tokenizer, _pairs(smol_tokenizer))
    assert pack_shared_prompts(*batch) is not None
    two_rows, grads_two = _log_probs_and_grads(model, False, batch, bf16)
    shared, grads_shared = _log_probs_and_grads(model, True, batch, bf16, eager)  # against two rows under sdpa
    on_labels = batch[2][:, 1:] != -100
    assert (two_rows[~on_labels] == 0).all() and (shared[~on_labels] == 0).all()
    worst = (two_rows - shared).abs().max().item()
    print(f"{'bf16' if bf16 else 'fp32'}: largest per-token log-prob difference {worst:.2e}")
    assert worst <= (BF16_TOKEN_TOL if bf16 else FP32_TOKEN_TOL)
    assert not torch.equal(two_rows, torch.zeros_like(two_rows))
    assert grads_two.keys() == grads_shared.keys() and grads_two
    for name, g in grads_two.items():
        scale = g.abs().max().item()
        assert (g - grads_shared[name]).abs().max().item() <= (0.1 if bf16 else 1e-3) * max(scale, 1e-6), name


def test_shared_rows_are_used_only_for_plain_causal_attention(tiny_policy):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    assert shares_prompts(AutoModelForCausalLM.from_pretrained(tiny_policy))
    windowed = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=4)
    assert not shares_prompts(Qwen2ForCausalLM(windowed))
