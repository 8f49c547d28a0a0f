"""Token-budget batching for rescoring and reward scoring."""

import random

import numpy as np
import pytest
import torch

from selfplay.backends.batching import padding_fraction, token_budget_batches


def test_batches_respect_the_budget_and_row_cap_and_cover_each_sequence_once():
    rng = random.Random(0)
    lengths = [rng.randint(5, 400) for _ in range(500)]
    batches = token_budget_batches(lengths, max_rows=32, max_tokens=2048)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for batch in batches:
        assert len(batch) <= 32
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 2048
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)  # longest first
    # short sequences share big batches, long ones small: more rows per batch at the short end
    assert len(batches[-1]) > len(batches[0])
    assert padding_fraction(lengths, batches) < padding_fraction(lengths, token_budget_batches(lengths, 32))


def test_a_sequence_over_the_budget_runs_alone_and_none_means_fixed_batches():
    assert token_budget_batches([100, 10, 10], max_rows=8, max_tokens=50) == [[0], [1, 2]]
    assert token_budget_batches([3, 1, 2, 5], max_rows=2) == [[3, 0], [2, 1]]


@pytest.mark.parametrize("budget", [64, 400, None])
def test_log_probs_do_not_depend_on_the_batching(tiny_policy, smol_tokenizer, budget):
    from selfplay.backends.logprobs import completion_logps
    from selfplay.backends.modeling import load_causal_lm

    rng = random.Random(1)
    sequences = [([rng.randrange(100, 5000) for _ in range(rng.randint(3, 30))],
                  [rng.randrange(100, 5000) for _ in range(rng.randint(0, 20))]) for _ in range(24)]
    lengths = [len(p) + len(c) for p, c in sequences]
    model = load_causal_lm(tiny_policy, "float32", torch.device("cpu"))
    one_by_one, counts = completion_logps(model, sequences, torch.device("cpu"), [[i] for i in range(24)],
                                          smol_tokenizer.pad_token_id or 0)
    batched, _ = completion_logps(model, sequences, torch.device("cpu"), token_budget_batches(lengths, 16, budget),
                                  smol_tokenizer.pad_token_id or 0)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-5)
    assert (batched[counts == 0] == 0).all()
