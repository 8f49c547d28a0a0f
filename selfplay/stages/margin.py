"""margin — the implicit reward margin Δim of the round's policy π_r on every candidate pair.

Input:   round_XX/candidate_pairs.parquet; π_r; the reference model when model.reference is set
Output:  round_XX/pairs.parquet   candidate_pairs' columns + margin_implicit, and per side: logp_*_sum,
         logp_*_mean, n_tokens_* (+ ref_logp_*_sum with a reference model). Read and written window by window of
         whole prompts (`window_rows` candidate pairs; selfplay/rundir/tables.py); forward batches form inside a
         window, and a shard takes whole windows.
Forms:   default (SimPO, reference-free): ρ(y) = mean over response tokens of log π_r(y_t | x, y_<t);
         with model.reference (DPO):      ρ(y) = β · (log π_r(y|x) − log π_ref(y|x)), summed over tokens, β = trainer.beta.
         Δim = ρ(chosen) − ρ(rejected) (selfplay/core/margins.py). Log-probs are teacher-forced at temperature 1 over
         exactly the token ids the trainer will see (selfplay/backends/logprob_scorer.py), each distinct response
         once. The sums are DPO's reference log-probs of π_r, which the train stage reuses. margin.backend=vllm takes
         the same sums from a vLLM engine's prompt log-probs (agreement with hf: tests/test_vllm.py).
Alone:   selfplay stage margin round=R [shard=i num_shards=n]   (see selfplay/rundir/shards.py)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from selfplay.backends.logprob_scorer import LogpScorer, dpo_beta
from selfplay.backends.modeling import resolve_model_path
from selfplay.core.margins import empty_pool, with_margins
from selfplay.core.selection import unique_responses
from selfplay.errors import SelfplayError
from selfplay.rundir import tables
from selfplay.rundir.shards import shard_span

log = logging.getLogger("selfplay")

OUTPUTS = ("pairs.parquet",)


def CONFIG(cfg) -> tuple[str, ...]:  # noqa: N802 — the runner reads CONFIG from every stage
    """The DPO form (model.reference) scales Δim by trainer.beta, DPO's own β; the SimPO form has no scale."""
    return ("model.reference", "model.dtype", "model.trust_remote_code", "margin", "trainer.objective",
            "trainer.mmpo_logits", "trainer.max_length", "precision", "window_rows") + (
            ("trainer.beta",) if cfg.model.reference else ())


def requires(r: int, cfg=None) -> list[tuple[int, str]]:
    return [(r, "pair")] + ([(r - 1, "train")] if r > 0 else [])


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
            pairs = with_margins(pairs, responses, dpo_beta(cfg))
            # A completion truncated to nothing (prompt ≥ trainer.max_length) has no margin and cannot be trained on.
            empty = (pairs["n_tokens_chosen"] == 0) | (pairs["n_tokens_rejected"] == 0)
            pairs = pairs[~empty].reset_index(drop=True)
            out.write(pairs)
            kept, dropped = kept + len(pairs), dropped + int(empty.sum())
            agree += int((pairs["margin_implicit"] > 0).sum())
            margin_sum += float(pairs["margin_implicit"].sum())
        if not spans:  # no candidate pairs: an empty pool with the documented columns
            out.empty = empty_pool(tables.read_rows(path, 0, 0), bool(cfg.model.reference))
    if dropped:
        log.warning("round %d: %d pairs dropped: prompt fills trainer.max_length=%d", ctx.round, dropped,
                    cfg.trainer.max_length)
    ctx.stats.update(pairs=kept, responses_scored=int(offsets[-1]), dropped_truncated=dropped,
                     tokens=int(columns["n_tokens"].sum()), chat_template_sha256=part_stats[0]["chat_template_sha256"],
                     form="dpo" if cfg.model.reference else "simpo",
                     # policy–judge agreement: share of pairs π_r already orders like the judge (Δim > 0)
                     implicit_agrees_with_judge=round(agree / kept, 4) if kept else None,
                     mean_margin_implicit=round(margin_sum / kept, 4) if kept else None)


