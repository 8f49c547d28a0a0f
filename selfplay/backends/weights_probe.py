"""The weights probe: does a running engine hold the checkpoint it is meant to sample from?

After an engine starts or loads new weights (backends/engine_keeper.py), each engine teacher-forces a few fixed
probe sequences (chat-formatted prompts with fixed responses) and its log-probs are compared with those of the
checkpoint on disk, computed as the margin stage computes them (transformers, model.dtype, at the run's precision).
An engine that kept the previous round's weights — the bug peers have shipped, where a trainer's update never reached
the sampler — or loaded the wrong checkpoint disagrees by far more than the arithmetic allows, and the run stops
with one line naming the checkpoint and the figures.

The statistic is |Σ log p_engine − Σ log p_disk| per probe sequence, summed over the sequences and divided by their
completion tokens (nats a token). The two sides compute the same function in different arithmetic: the engine in
bf16 (precision=bf16) or fp32, the reference with fp32 weights, under bf16 autocast or in fp32. bf16 keeps 8
significant bits; on SmolLM2-135M the statistic measured 0.011–0.015 between an engine and its own checkpoint
(2026-12-07, avx512bf16: π_0, π_1, π_2 of the default run, each loaded fresh or in place), while one round of
training moved it by 0.145 (π_0 → π_1) and 0.21 (π_1 → π_2). PROBE_BOUND_BF16 = 0.06 is four times the largest
agreement figure and under half the smallest one-round change. In fp32 vLLM and transformers agree to ~1e-4 a token
(tests/test_vllm.py); PROBE_BOUND_FP32 = 0.01.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selfplay.backends.chat import training_tokens
from selfplay.backends.logprobs import completion_logps
from selfplay.backends.modeling import load_causal_lm, load_tokenizer
from selfplay.errors import SelfplayError

log = logging.getLogger("selfplay")

PROBE_BOUND_BF16 = 0.06
PROBE_BOUND_FP32 = 0.01

# Fixed probe texts: ordinary instructions and answers of the kind the default loop trains on.
PROBE_TEXTS = (
    ("Write a short note to a friend about your weekend. Use at least two bullet points.",
     "Hi Sam,\n\n- On Saturday I went hiking by the lake.\n- On Sunday I baked bread and read a book.\n\nSee you soon!"),
    ("Explain in two sentences why the sky is blue. Do not use any commas.",
     "Sunlight is scattered by the air and blue light scatters the most. That is why the sky looks blue to us."),
    ("List three fruits in capital letters only.", "APPLE\nBANANA\nCHERRY"),
    ("Answer with a title in double angular brackets, then one line: what is a good morning habit?",
     "<<A Calm Start>>\nDrinking a glass of water and stretching for five minutes is a good morning habit."),
)


class StaleWeightsError(SelfplayError):
    """An engine's log-probs do not match the checkpoint it was told to load."""


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe compares the engine with: the checkpoint, and how the margin stage would compute it."""

    model_path: str
    dtype: str = "float32"
    bf16: bool = False
    trust_remote_code: bool = False


def probe_sequences(tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    return [training_tokens(tokenizer, prompt, response, "dpo", 2048) for prompt, response in PROBE_TEXTS]


def disk_logps(settings: ProbeSettings, sequences: list[tuple[list[int], list[int]]], pad_token_id: int) -> Any:
    """Per-sequence log-prob sums of the checkpoint on disk, on the CPU, as the margin stage computes them."""
    import torch

    cpu = torch.device("cpu")
    model = load_causal_lm(Path(settings.model_path), settings.dtype, cpu, settings.trust_remote_code).eval()
    sums, _ = completion_logps(model, sequences, cpu, [list(range(len(sequences)))], pad_token_id,
                               desc="weights probe", bf16=settings.bf16)
    return sums


def check_engine_weights(pool: Any, settings: ProbeSettings) -> dict:
    """Compare every engine of `pool` with the checkpoint at settings.model_path; raise StaleWeightsError beyond
    the bound of the engine's precision. Returns the figures for the stage's manifest."""
    tokenizer = load_tokenizer(Path(settings.model_path), settings.trust_remote_code)
    # within the engine's context: completions cut short, a prompt that leaves no completion token left out
    room = pool.spec.max_model_len - 1
    sequences = [(p, c[: room - len(p)]) for p, c in probe_sequences(tokenizer) if len(p) < room]
    if not sequences:
        log.warning("weights probe skipped: sampler.max_model_len=%d leaves no room for its sequences",
                    pool.spec.max_model_len)
        return {"skipped": f"sampler.max_model_len={pool.spec.max_model_len} is shorter than the probe's prompts"}
    tokens = np.array([len(c) for _, c in sequences])
    expected = disk_logps(settings, sequences, tokenizer.pad_token_id)
    bound = PROBE_BOUND_FP32 if pool.spec.dtype in ("float32", "fp32") and not settings.bf16 else PROBE_BOUND_BF16
    worst = 0.0
    for engine, got in enumerate(pool.each("completion_logprobs", sequences)):
        # mean over the probe's tokens of the per-token difference, sequence by sequence
        gap = float(np.abs(np.asarray(got) - expected).sum() / tokens.sum())
        worst = max(worst, gap)
        if not gap <= bound:  # NaN fails too
            raise StaleWeightsError(
                f"vLLM engine {engine} does not hold the weights of {settings.model_path}: its log-probs on the "
                f"{len(sequences)} probe sequences differ from the checkpoint's by {gap:.3f} nats a token (bound "
                f"{bound}); the run stops rather than sample from other weights")
    return {"sequences": len(sequences), "tokens": int(tokens.sum()), "mean_abs_token_gap": round(worst, 5),
            "bound": bound}
