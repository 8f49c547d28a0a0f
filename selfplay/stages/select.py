"""select — rank the round's pairs by a metric and keep the top k (or a ratio) of the pool.

Input:   round_XX/pairs.parquet
Output:  round_XX/selected.parquet   pairs' columns + metric, score, rank (1 = kept first); for map also
         z_margin_explicit, z_abs_margin_implicit and map_weight (z over the whole pool, so the score can be
         checked from the file alone). Loads with `datasets.load_dataset("parquet", data_files=…)` and trains
         in TRL as-is (conversational columns).
         round_XX/README.md          a Hugging Face dataset card whose `configs` point at selected.parquet, so
         `datasets.load_dataset("round_XX")` (or the folder pushed to the Hub) loads exactly the selected pairs.
Metrics: map       z(Δex) − w·z(|Δim|)  (alignment potential, arXiv 2503.01864; z over the round's pool,
                   population std, std 0 → all zeros)
         explicit  Δex (largest first)      implicit  −|Δim| (smallest |Δim| first)
         random    a seeded permutation     all       every pair (score Δex, for the ranking only)
Alone:   selfplay stage select round=R
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from ..config import round_seed

log = logging.getLogger("selfplay")

OUTPUTS = ("selected.parquet", "README.md")
CONFIG = ("selection", "seed")


def requires(r: int) -> list[tuple[int, str]]:
    return [(r, "margin")]


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


def map_score(margin_explicit: np.ndarray, margin_implicit: np.ndarray, weight: float) -> np.ndarray:
    """Alignment potential: high when the judge sees a large gap the policy has not learnt yet."""
    return zscore(margin_explicit) - weight * zscore(np.abs(np.asarray(margin_implicit, dtype=np.float64)))


def metric_scores(pairs: pd.DataFrame, metric: str, weight: float, seed: int) -> np.ndarray:
    ex = pairs["margin_explicit"].to_numpy(dtype=np.float64)
    im = pairs["margin_implicit"].to_numpy(dtype=np.float64)
    if metric == "map":
        return map_score(ex, im, weight)
    if metric == "explicit" or metric == "all":
        return ex
    if metric == "implicit":
        return -np.abs(im)
    if metric == "random":
        return np.random.default_rng(seed).random(len(pairs))
    raise ValueError(f"selection.metric: unknown metric {metric!r}")


def keep_count(pool: int, top_k: int | None, ratio: float | None, metric: str) -> int:
    if metric == "all":
        return pool
    if top_k is not None:
        return min(top_k, pool)
    return min(pool, math.ceil(ratio * pool))


def select(pairs: pd.DataFrame, metric: str, weight: float = 1.0, top_k: int | None = None,
           ratio: float | None = None, seed: int = 0) -> pd.DataFrame:
    """The kept pairs, best first, with metric, score and rank columns. Equal scores keep prompt_id order."""
    scored = pairs.sort_values("prompt_id", kind="stable").reset_index(drop=True)
    scored["metric"] = metric
    scored["score"] = metric_scores(scored, metric, weight, seed)
    if metric == "map":
        scored["z_margin_explicit"] = zscore(scored["margin_explicit"].to_numpy())
        scored["z_abs_margin_implicit"] = zscore(scored["margin_implicit"].abs().to_numpy())
        scored["map_weight"] = float(weight)
    ranked = scored.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    return ranked.head(keep_count(len(ranked), top_k, ratio, metric)).reset_index(drop=True)


def dataset_card(ctx, selected: pd.DataFrame, pool: int) -> str:
    """HF dataset-card text: YAML header (what `datasets` reads) and how the pairs were made."""
    cfg = ctx.cfg
    sel = cfg.selection
    how = {"map": f"MAP alignment potential z(Δex) − {sel.weight}·z(|Δim|) (arXiv 2503.01864)",
           "explicit": "largest explicit (reward-model) margin", "implicit": "smallest |implicit margin|",
           "random": "a seeded random subset", "all": "no selection (every non-tie pair)"}[sel.metric]
    judge = cfg.reward.function if cfg.reward.backend == "function" else cfg.reward.model
    policy = cfg.model.path if ctx.round == 0 else f"round_{ctx.round - 1:02d}/policy of this run"
    return "\n".join([
        "---",
        "task_categories:", "- text-generation",
        "tags:", "- dpo", "- preference", "- self-play", "- selfplay",
        "size_categories:", "- n<1K" if len(selected) < 1000 else "- 1K<n<10K" if len(selected) < 10_000 else "- 10K<n<100K",
        "configs:", "- config_name: default", "  data_files:", "  - split: train", "    path: selected.parquet",
        "---", "",
        f"# selfplay round {ctx.round}: selected preference pairs", "",
        f"{len(selected)} preference pairs kept from a pool of {pool} by {how}. Each pair is the highest- and "
        f"lowest-reward of {cfg.sampler.n} responses sampled (T={cfg.sampler.temperature}, top-p {cfg.sampler.top_p}) "
        f"from the policy π_{ctx.round} ({policy}), judged by `{judge}`.", "",
        "Columns: `prompt`, `chosen`, `rejected` in TRL's conversational preference format; `reward_chosen`, "
        "`reward_rejected`, `margin_explicit` (Δex), `margin_implicit` (Δim under π_r), the log-probabilities "
        "behind it, and `metric`, `score`, `rank` of the selection.", "",
        "```python", "from datasets import load_dataset", "",
        "pairs = load_dataset(\"path/to/round_dir\")[\"train\"]   # or a Hub repo holding this folder",
        "# trl.DPOTrainer(model=..., train_dataset=pairs, ...) applies the same chat template selfplay used", "```", "",
        "Made by selfplay's select stage; the run's `config.yaml` (one folder up) has every setting.", ""])


def run(ctx) -> None:
    sel = ctx.cfg.selection
    pairs = ctx.read_parquet("pairs.parquet")
    if sel.top_k is not None and sel.top_k > len(pairs):
        # Ties (or dropped truncated pairs) left fewer pairs than asked for; a start-up check refuses a top_k
        # that no pool could meet.
        log.warning("round %d: selection.top_k=%d exceeds this round's pool of %d pairs (ties and truncated pairs are "
                    "dropped); keeping all of them", ctx.round, sel.top_k, len(pairs))
    selected = select(pairs, sel.metric, sel.weight, sel.top_k, sel.ratio, seed=round_seed(ctx.cfg.seed, ctx.round))
    selected.to_parquet(ctx.out / "selected.parquet", index=False)
    (ctx.out / "README.md").write_text(dataset_card(ctx, selected, len(pairs)))
    ctx.stats.update(pool=len(pairs), selected=len(selected), metric=sel.metric,
                     short_of_top_k=max(sel.top_k - len(pairs), 0) if sel.top_k is not None else 0,
                     mean_margin_explicit_selected=round(float(selected["margin_explicit"].mean()), 4) if len(selected) else None,
                     mean_abs_margin_implicit_selected=round(float(selected["margin_implicit"].abs().mean()), 4) if len(selected) else None)
