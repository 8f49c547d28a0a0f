"""margin — the implicit reward margin Δim of the round's policy π_r on every candidate pair.

Input:   round_XX/candidate_pairs.parquet; π_r; the reference model when model.reference is set
Output:  round_XX/pairs.parquet   candidate_pairs' columns + margin_implicit, and per side: logp_*_sum,
         logp_*_mean, n_tokens_* (+ ref_logp_*_sum with a reference model). Read and written window by window of
         whole prompts (`window_rows` candidate pairs; selfplay/rundir/tables.py); forward batches form inside a
         window, and a shard takes whole windows.
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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from selfplay.backends.batching import token_budget_batches
from selfplay.backends.chat import template_sha256, token_format, training_tokens
from selfplay.backends.logprobs import TokenPairs, completion_logps
from selfplay.backends.modeling import load_causal_lm, load_tokenizer, resolve_model_path
from selfplay.backends.precision import engine_dtype, train_bf16
from selfplay.backends.vllm_engine import EngineMap, engine_spec
from selfplay.core.selection import unique_responses
from selfplay.errors import SelfplayError
from selfplay.rundir import tables
from selfplay.rundir.shards import shard_span

log = logging.getLogger("selfplay")

OUTPUTS = ("pairs.parquet",)
CONFIG = ("model.reference", "model.dtype", "model.trust_remote_code", "margin", "trainer.objective",
          "trainer.mmpo_logits", "trainer.max_length", "trainer.bf16", "precision", "window_rows")


def requires(r: int, cfg=None) -> list[tuple[int, str]]:
    return [(r, "pair")] + ([(r - 1, "train")] if r > 0 else [])


class LogpScorer:
    """Log-prob sums and token counts of responses under one model, loaded once for all the windows a stage scores.

    hf forwards token-budget batches of each call's responses (margin.max_batch_tokens, at most margin.batch_size
    rows; selfplay/backends/batching.py); vllm takes the same sums from an engine's prompt log-probs, in chunks of
    ITEMS_PER_CALL, its engines kept up until `close`."""

    def __init__(self, model_path, cfg, device):
        self.cfg, self.device = cfg, device
        self.tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
        self.template = template_sha256(self.tokenizer)
        if cfg.margin.backend == "vllm":
            spec = engine_spec(model_path, engine_dtype(cfg), device, cfg.sampler, cfg.model.trust_remote_code)
            spec.max_model_len = max(spec.max_model_len, cfg.trainer.max_length)
            self.engines = EngineMap(spec, cfg.sampler, cfg.ray)
        else:
            self.model = load_causal_lm(model_path, cfg.model.dtype, device, cfg.model.trust_remote_code)

    def __call__(self, responses: pd.DataFrame, desc: str) -> pd.DataFrame:
        """row (position in `responses`), logp_sum, n_tokens."""
        cfg = self.cfg
        sequences = TokenPairs(training_tokens(self.tokenizer, p, r, token_format(cfg.trainer), cfg.trainer.max_length)
                               for p, r in zip(responses["prompt"], responses["response"], strict=True))
        if cfg.margin.backend == "vllm":
            items = [sequences[i] for i in range(len(sequences))]
            sums = np.array(self.engines("completion_logprobs", items, desc, tokens=lambda seq: len(seq[0]) + len(seq[1])),
                            dtype=np.float64)
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

    def __enter__(self) -> LogpScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def response_windows(path: Path, rows: int | None) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Windows of whole prompts over candidate_pairs' rows, and where each window's distinct responses start in the
    round's list of them (responses are numbered window by window, in unique_responses order)."""
    codes = tables.key_codes(path)
    tables.check_contiguous(codes, path)
    spans = tables.group_windows(codes, rows)
    sides = tables.read_columns(path, ["chosen_sample_idx", "rejected_sample_idx"])
    key = np.concatenate([codes.astype(np.int64) * (1 << 20) + sides[c].to_numpy() for c in sides.columns])
    counts = [len(np.unique(np.r_[key[lo:hi], key[len(codes) + lo:len(codes) + hi]])) for lo, hi in spans]
    return spans, np.r_[0, np.cumsum(counts, dtype=np.int64)]


def compute(ctx, shard: int, num_shards: int) -> Iterator[pd.DataFrame]:
    """Log-prob sums of this shard's windows' responses under π_r (model "policy") and the reference model, if any,
    keyed by the response's number in the round (a shard takes whole windows: selfplay/rundir/shards.py). Yields
    them window by window, as the part file takes them, so nothing of earlier windows stays in memory."""
    cfg = ctx.cfg
    path = ctx.path("candidate_pairs.parquet")
    spans, offsets = response_windows(path, cfg.window_rows)
    lo, hi = shard_span(len(spans), 1, shard, num_shards)
    label = f"round {ctx.round} margin" + (f" {shard}/{num_shards}" if num_shards > 1 else "")
    models = [("policy", ctx.policy_path())] + ([("reference", resolve_model_path(cfg.model.reference))]
                                                if cfg.model.reference else [])
    yield pd.DataFrame({"row": pd.Series(dtype="int64"), "logp_sum": pd.Series(dtype="float64"),
                        "n_tokens": pd.Series(dtype="int64"), "model": pd.Series(dtype=object)})
    for name, model_path in models:
        with LogpScorer(model_path, cfg, ctx.device) as scorer:
            for w, (_, _, pairs) in enumerate(tables.iter_windows(path, spans[lo:hi]), start=lo):
                desc = (label if name == "policy" else f"round {ctx.round} reference") + (
                    f" window {w + 1}/{len(spans)}" if len(spans) > 1 else "")
                values = scorer(unique_responses(pairs), desc)
                del pairs
                yield values.assign(row=values["row"] + offsets[w], model=name)
        if name == "policy":
            ctx.stats.update(chat_template_sha256=scorer.template)


def merge(ctx, parts: list[Path], part_stats: list[dict]) -> None:
    """pairs.parquet, window by window: each window's pairs with their responses' log-probs and Δim."""
    cfg = ctx.cfg
    path = ctx.path("candidate_pairs.parquet")
    spans, offsets = response_windows(path, cfg.window_rows)
    values = tables.read_arrow(parts)  # arrow: no Python string per response
    columns = {}
    for model, prefix in (("policy", ""), ("reference", "ref_")) if cfg.model.reference else (("policy", ""),):
        mine = values.filter(pc.equal(values["model"], model))
        mine = mine.take(pc.sort_indices(mine["row"]))
        if not np.array_equal(mine["row"].to_numpy(), np.arange(int(offsets[-1]))):
            raise SelfplayError(f"round {ctx.round} margin: the shard parts do not cover the {int(offsets[-1])} "
                                f"responses ({model}); delete shards/margin in the round directory and run it again")
        columns[f"{prefix}logp_sum"] = mine["logp_sum"].to_numpy()
        if model == "policy":
            columns["n_tokens"] = mine["n_tokens"].to_numpy()
        del mine
    del values
    kept = dropped = agree = 0
    margin_sum = 0.0
    with tables.TableWriter(ctx.out / "pairs.parquet") as out:
        for w, (_, _, pairs) in enumerate(tables.iter_windows(path, spans)):
            responses = unique_responses(pairs)
            a, b = offsets[w], offsets[w + 1]
            responses = responses.assign(**{name: col[a:b] for name, col in columns.items()})
            pairs = with_margins(pairs, responses, cfg)
            # A completion truncated to nothing (prompt ≥ trainer.max_length) has no margin and cannot be trained on.
            empty = (pairs["n_tokens_chosen"] == 0) | (pairs["n_tokens_rejected"] == 0)
            pairs = pairs[~empty].reset_index(drop=True)
            out.write(pairs)
            kept, dropped = kept + len(pairs), dropped + int(empty.sum())
            agree += int((pairs["margin_implicit"] > 0).sum())
            margin_sum += float(pairs["margin_implicit"].sum())
        if not spans:  # no candidate pairs: an empty pool with the documented columns
            out.empty = empty_pool(tables.read_rows(path, 0, 0), cfg)
    if dropped:
        log.warning("round %d: %d pairs dropped: prompt fills trainer.max_length=%d", ctx.round, dropped,
                    cfg.trainer.max_length)
    ctx.stats.update(pairs=kept, responses_scored=int(offsets[-1]), dropped_truncated=dropped,
                     tokens=int(columns["n_tokens"].sum()), chat_template_sha256=part_stats[0]["chat_template_sha256"],
                     form="dpo" if cfg.model.reference else "simpo",
                     # policy–judge agreement: share of pairs π_r already orders like the judge (Δim > 0)
                     implicit_agrees_with_judge=round(agree / kept, 4) if kept else None,
                     mean_margin_implicit=round(margin_sum / kept, 4) if kept else None)


def empty_pool(pairs: pd.DataFrame, cfg) -> pd.DataFrame:
    """with_margins' columns for a pool with no pairs."""
    added = [f"{prefix}{side}{suffix}" for side in ("chosen", "rejected") for prefix, suffix in
             (("logp_", "_sum"), ("logp_", "_mean"), ("n_tokens_", ""))
             + ((("ref_logp_", "_sum"),) if cfg.model.reference else ())] + ["margin_implicit"]
    return pairs.assign(**{c: pd.Series(dtype="int64" if c.startswith("n_tokens") else "float64") for c in added})


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
    models = [("", policy_path, desc)] + ([("ref_", resolve_model_path(cfg.model.reference), f"{desc} reference")]
                                         if cfg.model.reference else [])
    for prefix, model_path, label in models:
        with LogpScorer(model_path, cfg, device) as scorer:
            values = scorer(responses, label)
        responses[f"{prefix}logp_sum"] = values["logp_sum"].to_numpy()
        if not prefix:
            responses["n_tokens"] = values["n_tokens"].to_numpy()
    return with_margins(pairs, responses, cfg)
