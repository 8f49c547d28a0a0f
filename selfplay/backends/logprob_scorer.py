"""The log-prob scorer (a backend: selfplay/backends/base.py): teacher-forced log-prob sums and token counts of
responses under one model, over exactly the token ids the trainer will see (selfplay.backends.chat.training_tokens).
The margin stage, eval's drift figure and offline selection use it; `pair_margins` is the whole margin computation
in one process for pairs from anywhere.

margin.backend=hf forwards token-budget batches in this process (selfplay/backends/logprobs.py); margin.backend=vllm
takes the same sums from an engine's prompt log-probs (agreement: tests/test_vllm.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from selfplay.backends.base import Backend
from selfplay.backends.batching import token_budget_batches
from selfplay.backends.chat import template_sha256, token_format, training_tokens
from selfplay.backends.logprobs import TokenPairs, completion_logps
from selfplay.backends.modeling import load_causal_lm, load_tokenizer, resolve_model_path
from selfplay.backends.precision import engine_dtype, train_bf16
from selfplay.backends.vllm_engine import EngineMap, engine_spec
from selfplay.core.margins import with_margins
from selfplay.core.selection import unique_responses


class LogpScorer(Backend):
    """Log-prob sums and token counts of responses under one model, loaded once for all the windows a stage scores.

    hf forwards token-budget batches of each call's responses (margin.max_batch_tokens, at most margin.batch_size
    rows; selfplay/backends/batching.py); vllm takes the same sums from an engine's prompt log-probs, in chunks of
    ITEMS_PER_CALL, its engines up for the `with` block (or for one call outside one)."""

    def __init__(self, model_path: Any, cfg: Any, device: Any):
        self.cfg, self.device = cfg, device
        self.tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
        self.template = template_sha256(self.tokenizer)
        if cfg.margin.backend == "vllm":
            spec = engine_spec(model_path, engine_dtype(cfg), device, cfg.sampler, cfg.model.trust_remote_code)
            spec.max_model_len = max(spec.max_model_len, cfg.trainer.max_length)
            self.engines = EngineMap(spec, cfg.sampler, cfg.ray)
        else:
            self.model = load_causal_lm(model_path, cfg.model.dtype, device, cfg.model.trust_remote_code)

    def __call__(self, responses: pd.DataFrame, desc: str = "log-probs") -> pd.DataFrame:
        """row (position in `responses`: columns prompt, response), logp_sum, n_tokens."""
        cfg = self.cfg
        sequences = TokenPairs(training_tokens(self.tokenizer, p, r, token_format(cfg.trainer), cfg.trainer.max_length)
                               for p, r in zip(responses["prompt"], responses["response"], strict=True))
        if cfg.margin.backend == "vllm":
            items = [sequences[i] for i in range(len(sequences))]
            with self.engines_for_call():
                sums = np.array(self.engines("completion_logprobs", items, desc,
                                             tokens=lambda seq: len(seq[0]) + len(seq[1])), dtype=np.float64)
        else:
            batches = token_budget_batches(sequences.lengths().tolist(), cfg.margin.batch_size,
                                           cfg.margin.max_batch_tokens)
            sums, _ = completion_logps(self.model, sequences, self.device, batches, self.tokenizer.pad_token_id,
                                       desc=desc, bf16=train_bf16(cfg))
        return pd.DataFrame({"row": np.arange(len(sequences), dtype=np.int64), "logp_sum": np.asarray(sums, np.float64),
                             "n_tokens": sequences.completion_lengths().astype(np.int64)})

    def close(self) -> None:
        if self.cfg.margin.backend == "vllm":
            self.engines.close()


def dpo_beta(cfg: Any) -> float | None:
    """The β of the DPO-form Δim (trainer.beta, DPO's own) with model.reference; None (the SimPO form) without."""
    return cfg.trainer.beta if cfg.model.reference else None


def pair_margins(pairs: pd.DataFrame, cfg: Any, policy_path: Any, device: Any, desc: str) -> pd.DataFrame:
    """The margin stage's columns for pairs from anywhere (offline selection, accumulated earlier pairs), in this
    process: every distinct response scored once under the policy (and the reference model), then with_margins."""
    responses = unique_responses(pairs)
    models = [("", policy_path, desc)] + ([("ref_", resolve_model_path(cfg.model.reference), f"{desc} reference")]
                                         if cfg.model.reference else [])
    for prefix, model_path, label in models:
        with LogpScorer(model_path, cfg, device) as scorer:
            values = scorer(responses, label)
        responses[f"{prefix}logp_sum"] = values["logp_sum"].to_numpy()
        if not prefix:
            responses["n_tokens"] = values["n_tokens"].to_numpy()
    return with_margins(pairs, responses, dpo_beta(cfg))
