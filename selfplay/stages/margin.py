"""margin — the implicit reward margin Δim of the round's policy π_r on every candidate pair.

Input:   round_XX/candidate_pairs.parquet; π_r; the reference model when model.reference is set
Output:  round_XX/pairs.parquet   candidate_pairs' columns + margin_implicit, and per side: logp_*_sum,
         logp_*_mean, n_tokens_* (+ ref_logp_*_sum with a reference model)
Forms:   default (SimPO, reference-free): ρ(y) = mean over response tokens of log π_r(y_t | x, y_<t);
         with model.reference (DPO):      ρ(y) = β · (log π_r(y|x) − log π_ref(y|x)), summed over tokens.
         Δim = ρ(chosen) − ρ(rejected). Log-probs are teacher-forced at temperature 1 over exactly the token
         ids the trainer will see (selfplay.backends.chat.training_tokens), each distinct response once. The sums are
         DPO's reference log-probs of π_r, which the train stage reuses. margin.backend=vllm takes the same
         sums from a vLLM engine's prompt log-probs (agreement with hf: tests/test_vllm.py).
Alone:   selfplay stage margin round=R [shard=i num_shards=n]   (see selfplay/rundir/shards.py)
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from selfplay.backends.batching import token_budget_batches
from selfplay.backends.chat import template_sha256, token_format, training_tokens
from selfplay.backends.logprobs import TokenPairs, completion_logps
from selfplay.backends.modeling import load_causal_lm, load_tokenizer, resolve_model_path
from selfplay.backends.precision import engine_dtype, train_bf16
from selfplay.backends.vllm_engine import ITEMS_PER_CALL, engine_spec, map_items
from selfplay.core.selection import unique_responses
from selfplay.errors import SelfplayError
from selfplay.rundir.shards import shard_span

log = logging.getLogger("selfplay")

OUTPUTS = ("pairs.parquet",)
CONFIG = ("model.reference", "model.dtype", "model.trust_remote_code", "margin", "trainer.objective",
          "trainer.mmpo_logits", "trainer.max_length", "trainer.bf16", "precision")


def requires(r: int, cfg=None) -> list[tuple[int, str]]:
    return [(r, "pair")] + ([(r - 1, "train")] if r > 0 else [])


def vllm_logps(model_path, sequences: list[tuple[list[int], list[int]]], cfg, device, desc: str) -> np.ndarray:
    """The same sums as `completion_logps`, from the engine's prompt log-probs over prompt+completion ids."""
    spec = engine_spec(model_path, engine_dtype(cfg), device, cfg.sampler, cfg.model.trust_remote_code)
    spec.max_model_len = max(spec.max_model_len, cfg.trainer.max_length)
    sums = map_items(spec, cfg.sampler, cfg.ray, "completion_logprobs", sequences, desc,
                     tokens=lambda seq: len(seq[0]) + len(seq[1]))
    return np.array(sums, dtype=np.float64)


def score_model(model_path, responses: pd.DataFrame, cfg, device, desc: str,
                shard: tuple[int, int]) -> tuple[pd.DataFrame, str]:
    """Log-prob sums and token counts of this shard's share of the responses under one model, keyed by row.

    The schedule is the backend's: hf forwards token-budget batches (margin.max_batch_tokens, at most
    margin.batch_size rows; selfplay/backends/batching.py), vllm sends chunks of ITEMS_PER_CALL in row order; a shard takes
    whole batches of it (selfplay/rundir/shards.py)."""
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    sequences = TokenPairs(training_tokens(tokenizer, p, r, token_format(cfg.trainer), cfg.trainer.max_length)
                           for p, r in zip(responses["prompt"], responses["response"], strict=True))
    if cfg.margin.backend == "vllm":
        lo, hi = shard_span(len(sequences), ITEMS_PER_CALL, *shard)
        rows = list(range(lo, hi))
        sums = vllm_logps(model_path, [sequences[i] for i in rows], cfg, device, desc)
    else:
        # Token-budget batches of the whole list, fixed by the lengths alone; a shard takes a contiguous range.
        batches = token_budget_batches(sequences.lengths().tolist(), cfg.margin.batch_size,
                                       cfg.margin.max_batch_tokens)
        lo, hi = shard_span(len(batches), 1, *shard)
        rows = [i for batch in batches[lo:hi] for i in batch]
        model = load_causal_lm(model_path, cfg.model.dtype, device, cfg.model.trust_remote_code)
        all_sums, _ = completion_logps(model, sequences, device, batches[lo:hi], tokenizer.pad_token_id, desc=desc,
                                       bf16=train_bf16(cfg))
        sums = all_sums[rows]
    values = pd.DataFrame({"row": np.asarray(rows, dtype=np.int64), "logp_sum": np.asarray(sums, dtype=np.float64),
                           "n_tokens": sequences.completion_lengths()[rows].astype(np.int64)})
    return values, template_sha256(tokenizer)


def compute(ctx, shard: int, num_shards: int) -> pd.DataFrame:
    """Log-prob sums of this shard's responses under π_r (model "policy") and the reference model, if any."""
    cfg = ctx.cfg
    responses = unique_responses(ctx.read_parquet("candidate_pairs.parquet"))
    label = f"round {ctx.round} margin" + (f" {shard}/{num_shards}" if num_shards > 1 else "")
    policy, template = score_model(ctx.policy_path(), responses, cfg, ctx.device, label, (shard, num_shards))
    parts = [policy.assign(model="policy")]
    if cfg.model.reference:
        reference, _ = score_model(resolve_model_path(cfg.model.reference), responses, cfg, ctx.device,
                                   f"round {ctx.round} reference", (shard, num_shards))
        parts.append(reference.assign(model="reference"))
    ctx.stats.update(chat_template_sha256=template)
    return pd.concat(parts, ignore_index=True)


def merge(ctx, parts: list[Path], part_stats: list[dict]) -> None:
    cfg = ctx.cfg
    pairs = ctx.read_parquet("candidate_pairs.parquet")
    responses = unique_responses(pairs)
    values = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    for model, prefix in (("policy", ""), ("reference", "ref_")) if cfg.model.reference else (("policy", ""),):
        mine = values[values["model"] == model].set_index("row").sort_index()
        if not mine.index.equals(pd.RangeIndex(len(responses))):
            raise SelfplayError(f"round {ctx.round} margin: the shard parts do not cover the {len(responses)} "
                                f"responses ({model}); delete shards/margin in the round directory and run it again")
        responses[f"{prefix}logp_sum"] = mine["logp_sum"].to_numpy()
        if model == "policy":
            responses["n_tokens"] = mine["n_tokens"].to_numpy()
    pairs = with_margins(pairs, responses, cfg)
    # A completion truncated to nothing (prompt ≥ trainer.max_length) has no margin and cannot be trained on.
    empty = (pairs["n_tokens_chosen"] == 0) | (pairs["n_tokens_rejected"] == 0)
    if empty.any():
        log.warning("round %d: %d pairs dropped: prompt fills trainer.max_length=%d", ctx.round, int(empty.sum()),
                    cfg.trainer.max_length)
        pairs = pairs[~empty].reset_index(drop=True)
    pairs.to_parquet(ctx.out / "pairs.parquet", index=False)
    ctx.stats.update(pairs=len(pairs), responses_scored=len(responses), dropped_truncated=int(empty.sum()),
                     tokens=int(responses["n_tokens"].sum()), chat_template_sha256=part_stats[0]["chat_template_sha256"],
                     form="dpo" if cfg.model.reference else "simpo",
                     # policy–judge agreement: share of pairs π_r already orders like the judge (Δim > 0)
                     implicit_agrees_with_judge=round(float((pairs["margin_implicit"] > 0).mean()), 4) if len(pairs) else None,
                     mean_margin_implicit=round(float(pairs["margin_implicit"].mean()), 4) if len(pairs) else None)


def with_margins(pairs: pd.DataFrame, responses: pd.DataFrame, cfg) -> pd.DataFrame:
    """The pairs with each side's log-prob sum/mean/token count (responses: unique_responses + logp_sum, n_tokens,
    and ref_logp_sum with a reference model) and the implicit margin Δim of the configured form."""
    pairs = pairs.copy()
    sums, counts = responses["logp_sum"].to_numpy(), responses["n_tokens"].to_numpy()
    responses = responses.assign(logp_mean=np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))
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
    return pairs


def compute_margins(pairs: pd.DataFrame, cfg, policy_path, device, desc: str) -> pd.DataFrame:
    """The whole margin stage in this process for pairs from anywhere (offline selection, accumulated earlier
    pairs): every distinct response scored once under the policy (and the reference model), then with_margins."""
    responses = unique_responses(pairs)
    policy, _ = score_model(policy_path, responses, cfg, device, desc, (0, 1))
    policy = policy.set_index("row").sort_index()
    responses["logp_sum"], responses["n_tokens"] = policy["logp_sum"].to_numpy(), policy["n_tokens"].to_numpy()
    if cfg.model.reference:
        reference, _ = score_model(resolve_model_path(cfg.model.reference), responses, cfg, device,
                                   f"{desc} reference", (0, 1))
        responses["ref_logp_sum"] = reference.set_index("row").sort_index()["logp_sum"].to_numpy()
    return with_margins(pairs, responses, cfg)
