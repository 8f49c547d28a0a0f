"""margin — the implicit reward margin Δim of the round's policy π_r on every candidate pair.

Input:   round_XX/candidate_pairs.parquet; π_r; the reference model when model.reference is set
Output:  round_XX/pairs.parquet   candidate_pairs' columns + margin_implicit, and per side: logp_*_sum,
         logp_*_mean, n_tokens_* (+ ref_logp_*_sum with a reference model)
Forms:   default (SimPO, reference-free): ρ(y) = mean over response tokens of log π_r(y_t | x, y_<t);
         with model.reference (DPO):      ρ(y) = β · (log π_r(y|x) − log π_ref(y|x)), summed over tokens.
         Δim = ρ(chosen) − ρ(rejected). Log-probs are teacher-forced at temperature 1 over exactly the token
         ids the trainer will see (selfplay.chat.training_tokens), each distinct response once. The sums are
         DPO's reference log-probs of π_r, which the train stage reuses. margin.backend=vllm takes the same
         sums from a vLLM engine's prompt log-probs (agreement with hf: tests/test_vllm.py).
Alone:   selfplay stage margin round=R
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..chat import template_sha256, training_tokens
from ..logprobs import completion_logps
from ..modeling import load_causal_lm, load_tokenizer, resolve_model_path

log = logging.getLogger("selfplay")

OUTPUTS = ("pairs.parquet",)
CONFIG = ("model.reference", "model.dtype", "model.trust_remote_code", "margin", "trainer.objective",
          "trainer.max_length", "trainer.bf16")


def requires(r: int) -> list[tuple[int, str]]:
    return [(r, "pair")] + ([(r - 1, "train")] if r > 0 else [])


def unique_responses(pairs: pd.DataFrame) -> pd.DataFrame:
    """Distinct (prompt_id, sample_idx) responses of the pairs, each scored once however many pairs share it."""
    sides = [
        pd.DataFrame({"prompt_id": pairs["prompt_id"], "sample_idx": pairs[f"{side}_sample_idx"],
                      "prompt": [m[0]["content"] for m in pairs["prompt"]],
                      "response": [m[0]["content"] for m in pairs[side]]})
        for side in ("chosen", "rejected")
    ]
    return pd.concat(sides).drop_duplicates(["prompt_id", "sample_idx"]).reset_index(drop=True)


def vllm_logps(model_path, sequences: list[tuple[list[int], list[int]]], cfg, device, desc: str) -> np.ndarray:
    """The same sums as `completion_logps`, from the engine's prompt log-probs over prompt+completion ids."""
    from ..vllm_engine import engine_spec, map_items

    spec = engine_spec(model_path, cfg.model.dtype, device, cfg.sampler, cfg.model.trust_remote_code)
    spec.max_model_len = max(spec.max_model_len, cfg.trainer.max_length)
    sums = map_items(spec, cfg.sampler, cfg.ray, "completion_logprobs", sequences, desc,
                     tokens=lambda seq: len(seq[0]) + len(seq[1]))
    return np.array(sums, dtype=np.float64)


def score_model(model_path, responses: pd.DataFrame, cfg, device, desc: str) -> tuple[np.ndarray, np.ndarray, str]:
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    sequences = [
        training_tokens(tokenizer, p, r, cfg.trainer.objective, cfg.trainer.max_length)
        for p, r in zip(responses["prompt"], responses["response"], strict=True)
    ]
    if cfg.margin.backend == "vllm":
        sums, counts = vllm_logps(model_path, sequences, cfg, device, desc), np.array([len(c) for _, c in sequences])
    else:
        model = load_causal_lm(model_path, cfg.model.dtype, device, cfg.model.trust_remote_code)
        sums, counts = completion_logps(model, sequences, device, cfg.margin.batch_size, tokenizer.pad_token_id,
                                        desc=desc, bf16=cfg.trainer.bf16)
    return sums, counts, template_sha256(tokenizer)


def run(ctx) -> None:
    cfg = ctx.cfg
    pairs = ctx.read_parquet("candidate_pairs.parquet")
    responses = unique_responses(pairs)
    sums, counts, template = score_model(ctx.policy_path(), responses, cfg, ctx.device, f"round {ctx.round} margin")
    responses["logp_sum"] = sums
    responses["n_tokens"] = counts
    responses["logp_mean"] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    if cfg.model.reference:
        ref_sums, _, _ = score_model(resolve_model_path(cfg.model.reference), responses, cfg, ctx.device,
                                  f"round {ctx.round} reference")
        responses["ref_logp_sum"] = ref_sums

    keyed = responses.set_index(["prompt_id", "sample_idx"])
    for side in ("chosen", "rejected"):
        rows = keyed.loc[list(zip(pairs["prompt_id"], pairs[f"{side}_sample_idx"], strict=True))]
        pairs[f"logp_{side}_sum"] = rows["logp_sum"].to_numpy()
        pairs[f"logp_{side}_mean"] = rows["logp_mean"].to_numpy()
        pairs[f"n_tokens_{side}"] = rows["n_tokens"].to_numpy()
        if cfg.model.reference:
            pairs[f"ref_logp_{side}_sum"] = rows["ref_logp_sum"].to_numpy()
    if cfg.model.reference:
        beta = cfg.margin.beta
        rho_chosen = beta * (pairs["logp_chosen_sum"] - pairs["ref_logp_chosen_sum"])
        rho_rejected = beta * (pairs["logp_rejected_sum"] - pairs["ref_logp_rejected_sum"])
    else:
        rho_chosen, rho_rejected = pairs["logp_chosen_mean"], pairs["logp_rejected_mean"]
    pairs["margin_implicit"] = rho_chosen - rho_rejected

    # A completion truncated to nothing (prompt ≥ trainer.max_length) has no margin and cannot be trained on.
    empty = (pairs["n_tokens_chosen"] == 0) | (pairs["n_tokens_rejected"] == 0)
    if empty.any():
        log.warning("round %d: %d pairs dropped: prompt fills trainer.max_length=%d", ctx.round, int(empty.sum()),
                    cfg.trainer.max_length)
        pairs = pairs[~empty].reset_index(drop=True)
    pairs.to_parquet(ctx.out / "pairs.parquet", index=False)
    ctx.stats.update(pairs=len(pairs), responses_scored=len(responses), dropped_truncated=int(empty.sum()),
                     tokens=int(counts.sum()), chat_template_sha256=template,
                     form="dpo" if cfg.model.reference else "simpo",
                     # policy–judge agreement: share of pairs π_r already orders like the judge (Δim > 0)
                     implicit_agrees_with_judge=round(float((pairs["margin_implicit"] > 0).mean()), 4) if len(pairs) else None,
                     mean_margin_implicit=round(float(pairs["margin_implicit"].mean()), 4) if len(pairs) else None)
