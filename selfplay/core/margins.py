"""The implicit reward margin Δim of a pair: pure functions on tables of log-prob sums (the margin stage computes the
sums; selfplay/stages/margin.py).

    reference-free (SimPO's form, the default):  ρ(y) = mean over response tokens of log π(y_t | x, y_<t)
    with a reference model (DPO's form):         ρ(y) = β · (log π(y|x) − log π_ref(y|x)), summed over tokens
    Δim = ρ(chosen) − ρ(rejected)
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def added_columns(reference: bool) -> list[str]:
    """The columns with_margins adds to a pool of pairs."""
    suffixes = (("logp_", "_sum"), ("logp_", "_mean"), ("n_tokens_", "")) + ((("ref_logp_", "_sum"),) if reference else ())
    return [f"{prefix}{side}{suffix}" for side in ("chosen", "rejected") for prefix, suffix in suffixes] + ["margin_implicit"]


def empty_pool(pairs: pd.DataFrame, reference: bool) -> pd.DataFrame:
    """with_margins' columns for a pool with no pairs."""
    return pairs.assign(**{c: pd.Series(dtype="int64" if c.startswith("n_tokens") else "float64")
                           for c in added_columns(reference)})


def implicit_margin(pairs: pd.DataFrame, dpo_beta: float | None) -> pd.Series:
    """Δim of each pair from its sides' log-prob columns: the SimPO form from logp_*_mean (dpo_beta None), or the DPO
    form with β = dpo_beta from logp_*_sum and ref_logp_*_sum."""
    if dpo_beta is not None:
        beta = dpo_beta
        rho_chosen = beta * (pairs["logp_chosen_sum"] - pairs["ref_logp_chosen_sum"])
        rho_rejected = beta * (pairs["logp_rejected_sum"] - pairs["ref_logp_rejected_sum"])
    else:
        rho_chosen, rho_rejected = pairs["logp_chosen_mean"], pairs["logp_rejected_mean"]
    return rho_chosen - rho_rejected


def with_margins(pairs: pd.DataFrame, responses: pd.DataFrame, dpo_beta: float | None) -> pd.DataFrame:
    """The pairs with each side's log-prob sum/mean/token count and Δim (implicit_margin). `responses` holds each
    distinct response once (prompt_id, sample_idx: selfplay.core.selection.unique_responses) with logp_sum, n_tokens
    and, for the DPO form, ref_logp_sum. A response of no tokens has a NaN mean."""
    reference = dpo_beta is not None
    pairs = pairs.copy()
    sums, counts = responses["logp_sum"].to_numpy(), responses["n_tokens"].to_numpy()
    responses = responses.assign(logp_mean=np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))
    keyed = responses.set_index(["prompt_id", "sample_idx"])
    for side in ("chosen", "rejected"):
        rows = keyed.loc[list(zip(pairs["prompt_id"], pairs[f"{side}_sample_idx"], strict=True))]
        pairs[f"logp_{side}_sum"] = rows["logp_sum"].to_numpy()
        pairs[f"logp_{side}_mean"] = rows["logp_mean"].to_numpy()
        pairs[f"n_tokens_{side}"] = rows["n_tokens"].to_numpy()
        if reference:
            pairs[f"ref_logp_{side}_sum"] = rows["ref_logp_sum"].to_numpy()
    pairs["margin_implicit"] = implicit_margin(pairs, dpo_beta)
    return pairs
