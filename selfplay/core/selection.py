"""Selection metrics: pure functions on a pool of pairs (a table with margin_explicit, margin_implicit and, for
REAL, real_similarity). The select stage, the offline `selfplay select`, the data cards and the comparison all
use these; none of them needs a model.

    map       z(Δex) − w·z(|Δim|)   alignment potential (arXiv 2503.01864), z over the pool (population std; a
                                    constant pool gives zeros); signed=True uses z(Δim)
    explicit  Δex (largest first)   implicit  −|Δim|   real  −cos(e_chosen, e_rejected)   random  seeded
    all       every pair (scored Δex, for the ranking only)
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def zscore(values: np.ndarray) -> np.ndarray:
    """(a − mean) / std with the population std (ddof 0); a constant pool gives all zeros."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return values
    mean, std = values.mean(), values.std(ddof=0)
    # A constant pool's std comes out as rounding noise (e.g. 5e-17 for [0.4]*3), not 0: treat it as 0.
    if not np.isfinite(std) or std <= 1e-12 * max(1.0, abs(mean)):
        return np.zeros_like(values)
    return (values - mean) / std


def implicit_term(margin_implicit: np.ndarray, signed: bool = False) -> np.ndarray:
    """What MAP discounts: |Δim| (default: the policy already separates the pair, either way round), or Δim itself
    (signed: only a pair the policy already orders like the judge counts as learnt)."""
    margin_implicit = np.asarray(margin_implicit, dtype=np.float64)
    return margin_implicit if signed else np.abs(margin_implicit)


def auto_weight(margin_explicit: np.ndarray, margin_implicit: np.ndarray, signed: bool = False) -> float:
    """MAP's w for selection.weight=auto: max(0, Pearson correlation of Δex and the implicit term) over the pool.

    Why: MAP wants pairs whose judge margin is large for what the policy's own margin already accounts for.
    Regressing z(Δex) on z(m) (m = |Δim|, or Δim when signed), the residual z(Δex) − c·z(m) is exactly that part,
    and between z-scores the least-squares slope c is their correlation. When the policy's margins track the judge's
    (c → 1) the pairs it already separates are discounted fully; when they do not (c ≤ 0) they say nothing about
    what the judge still sees, and MAP falls back to the explicit margin. Nothing to tune; the value is recorded
    per round (selected.parquet's map_weight, the select manifest's map_weight).
    """
    ex, im = zscore(margin_explicit), zscore(implicit_term(margin_implicit, signed))
    if len(ex) < 2 or not ex.any() or not im.any():
        return 0.0
    return float(max(0.0, np.mean(ex * im)))  # mean of products of population z-scores = Pearson r


def map_score(margin_explicit: np.ndarray, margin_implicit: np.ndarray, weight: float,
              signed: bool = False) -> np.ndarray:
    """Alignment potential: high when the judge sees a large gap the policy has not learnt yet."""
    return zscore(margin_explicit) - weight * zscore(implicit_term(margin_implicit, signed))


def resolve_weight(pairs: pd.DataFrame, weight: float | str, signed: bool = False) -> float:
    """A fixed w as given, or `auto`'s value on this pool."""
    if weight == "auto":
        return auto_weight(pairs["margin_explicit"].to_numpy(), pairs["margin_implicit"].to_numpy(), signed)
    return float(weight)


def metric_scores(pairs: pd.DataFrame, metric: str, weight: float, seed: int, signed: bool = False) -> np.ndarray:
    ex = pairs["margin_explicit"].to_numpy(dtype=np.float64)
    im = pairs["margin_implicit"].to_numpy(dtype=np.float64)
    if metric == "map":
        return map_score(ex, im, weight, signed)
    if metric == "explicit" or metric == "all":
        return ex
    if metric == "implicit":
        return -np.abs(im)
    if metric == "real":
        if "real_similarity" not in pairs:
            raise ValueError("selection.metric=real needs a real_similarity column (select.real_similarity)")
        return -pairs["real_similarity"].to_numpy(dtype=np.float64)
    if metric == "random":
        return np.random.default_rng(seed).random(len(pairs))
    raise ValueError(f"selection.metric: unknown metric {metric!r}")


def keep_count(pool: int, top_k: int | None, ratio: float | None, metric: str) -> int:
    if metric == "all":
        return pool
    if top_k is not None:
        return min(top_k, pool)
    return min(pool, math.ceil(ratio * pool))


PAIR_KEY = ["prompt_id", "chosen_sample_idx", "rejected_sample_idx"]


def select(pairs: pd.DataFrame, metric: str, weight: float | str = 1.0, top_k: int | None = None,
           ratio: float | None = None, seed: int = 0, signed: bool = False) -> pd.DataFrame:
    """The kept pairs, best first, with metric, score and rank columns. Equal scores keep the pool's order
    (prompt_id, then sample indices)."""
    order = [c for c in PAIR_KEY if c in pairs]
    scored = pairs.sort_values(order, kind="stable").reset_index(drop=True)
    scored["metric"] = metric
    w = resolve_weight(scored, weight, signed) if metric == "map" else None
    scored["score"] = metric_scores(scored, metric, w, seed, signed)
    if metric == "map":
        scored["z_margin_explicit"] = zscore(scored["margin_explicit"].to_numpy())
        name = "z_margin_implicit" if signed else "z_abs_margin_implicit"
        scored[name] = zscore(implicit_term(scored["margin_implicit"].to_numpy(), signed))
        scored["map_weight"] = w
    ranked = scored.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    return ranked.head(keep_count(len(ranked), top_k, ratio, metric)).reset_index(drop=True)


def unique_responses(pairs: pd.DataFrame) -> pd.DataFrame:
    """Distinct (prompt_id, sample_idx) responses of the pairs, each scored once however many pairs share it."""
    sides = [
        pd.DataFrame({"prompt_id": pairs["prompt_id"], "sample_idx": pairs[f"{side}_sample_idx"],
                      "prompt": [m[0]["content"] for m in pairs["prompt"]],
                      "response": [m[0]["content"] for m in pairs[side]]})
        for side in ("chosen", "rejected")
    ]
    return pd.concat(sides).drop_duplicates(["prompt_id", "sample_idx"]).reset_index(drop=True)
