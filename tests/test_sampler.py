"""The hf sampler: the fast nucleus equals transformers' TopPLogitsWarper, and sampling is seeded."""

from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from selfplay.backends.samplers import SamplingSpec
from selfplay.backends.samplers.hf import nucleus_mask


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.999])
def test_nucleus_matches_transformers_top_p(top_p):
    torch.manual_seed(0)
    # peaked rows (nucleus inside the candidates) and flat rows (full-sort fallback)
    scores = torch.cat([torch.randn(16, 5000) * 6, torch.randn(4, 5000) * 0.01])
    expected = TopPLogitsWarper(top_p)(None, scores.clone()) == -float("inf")
    got = nucleus_mask(scores, top_p, candidates=64)
    assert torch.equal(got, expected)
    assert not got.all(dim=-1).any()  # at least one token survives


def test_sampled_tokens_equal_transformers_temperature_and_top_p(tiny_policy):
    """Whole generate() calls, same seed: selfplay's processor vs HF's own TemperatureLogitsWarper + TopPLogitsWarper
    must pick the same tokens (this also pins the processor's position in HF's pipeline)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from selfplay.backends.samplers.hf import TemperatureTopP

    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 2]])
    outs = []
    for ours in (False, True):
        cfg = GenerationConfig(do_sample=True, max_new_tokens=24, min_new_tokens=24, num_return_sequences=6,
                               temperature=None if ours else 0.7, top_p=None if ours else 0.9, top_k=0,
                               pad_token_id=2)
        torch.manual_seed(3)
        extra = {"logits_processor": [TemperatureTopP(0.7, 0.9)]} if ours else {}
        outs.append(model.generate(ids, generation_config=cfg, **extra))
    assert torch.equal(outs[0], outs[1])


def test_generation_is_seeded_and_n_per_prompt(tiny_policy):
    from selfplay.backends.samplers.hf import HFSampler

    sampler = HFSampler(tiny_policy, "float32", torch.device("cpu"))
    prompts = ["Write one word.", "Name a colour in lowercase.", "Say hello in French, with no commas."]
    spec = SamplingSpec(n=3, max_new_tokens=10, temperature=0.8, top_p=0.95, seed=4, batch_size=2)
    a, b = sampler(prompts, spec), sampler(prompts, spec)
    def rows(completions):
        return [(c.prompt_index, c.sample_idx, c.response, c.n_tokens) for c in completions]

    assert rows(a) == rows(b)
    assert [(c.prompt_index, c.sample_idx) for c in a] == [(p, i) for p in range(3) for i in range(3)]
    assert all(1 <= c.n_tokens <= 10 and c.finish_reason in ("stop", "length") for c in a)
    other = sampler(prompts, SamplingSpec(n=3, max_new_tokens=10, temperature=0.8, top_p=0.95, seed=5,
                                                   batch_size=2))
    assert [c.response for c in other] != [c.response for c in a]


def test_cdf_sampling_draws_the_softmax_of_the_tempered_nucleus():
    """Greedy decoding after TemperatureTopP + SampleByCDF draws each token with its tempered nucleus probability."""
    from selfplay.backends.samplers.hf import SampleByCDF, TemperatureTopP

    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 2
    tempered = TemperatureTopP(0.7, 0.9)(None, logits.clone())
    expected = torch.softmax(tempered, dim=-1)[0]
    draws = 200_000
    torch.manual_seed(1)
    picks = SampleByCDF()(None, tempered.expand(draws, -1).clone()).argmax(dim=-1)
    freq = torch.bincount(picks, minlength=50).float() / draws
    assert (freq[expected == 0] == 0).all()  # never outside the nucleus
    # binomial standard error per token; 5 of them is far outside chance for a correct sampler
    assert ((freq - expected).abs() <= 5 * (expected * (1 - expected) / draws).sqrt() + 1e-4).all()


def test_the_sampling_code_version_follows_the_sampling_code(tmp_path):
    """eval's cache of π_0 responses is keyed by it: an edit to a sampler's code must change it."""
    import shutil

    from selfplay.backends import samplers

    package = Path(samplers.__file__).resolve().parents[1].parent
    copy = tmp_path / "selfplay"
    for part in samplers.SAMPLING_CODE:
        source, target = package / part, copy / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    before = samplers.sampling_code_version(copy)
    assert before == samplers.sampling_code_version(package) == samplers.sampling_code_version()
    hf = copy / "backends" / "samplers" / "hf.py"
    hf.write_text(hf.read_text() + "\n# an edit\n")
    assert samplers.sampling_code_version(copy) != before
