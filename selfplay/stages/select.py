"""select — rank the round's pairs by a metric and keep the top k (or a ratio) of the pool.

Input:   round_XX/pairs.parquet (+ π_r for metric=real; + earlier rounds' selected.parquet with accumulate)
Output:  round_XX/selected.parquet   pairs' columns + metric, score, rank (1 = kept first); for map also
         z_margin_explicit, z_abs_margin_implicit (z_margin_implicit when signed) and map_weight (z over the whole
         pool, so the score can be checked from the file alone); for real also real_similarity. Loads with
         `datasets.load_dataset("parquet", data_files=…)` and trains in TRL as-is (conversational columns).
         round_XX/README.md          a Hugging Face dataset card whose `configs` point at selected.parquet, so
         `datasets.load_dataset("round_XX")` (or the folder pushed to the Hub) loads exactly the selected pairs.
Metrics: map       z(Δex) − w·z(|Δim|)  (alignment potential, arXiv 2503.01864; z over the round's pool,
                   population std, std 0 → all zeros); selection.signed=true uses z(Δim) instead of z(|Δim|)
                   (a pair the policy orders the wrong way round then counts as unlearnt, not as learnt).
                   selection.weight=auto sets w per round from the pool (auto_weight below).
         explicit  Δex (largest first)      implicit  −|Δim| (smallest |Δim| first)
         real      −cos(e_chosen, e_rejected): least similar responses first (REAL, arXiv 2409.17169); e is the
                   mean over response tokens of the policy's last hidden layer, or of selection.real_encoder's
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


def CONFIG(cfg) -> tuple[str, ...]:  # noqa: N802 — the runner reads CONFIG from every stage
    """metric=real and accumulate run π_r (and the reference) over the training tokens: those keys count too."""
    runs_policy = cfg.selection.metric == "real" or cfg.selection.accumulate
    return ("selection", "seed") + (("model.dtype", "model.reference", "trainer.objective", "trainer.mmpo_logits",
                                     "trainer.max_length", "margin", "trainer.bf16", "precision")
                                    if runs_policy else ())


def requires(r: int, cfg=None) -> list[tuple[int, str]]:
    accumulate = cfg is not None and cfg.selection.accumulate and r > 0
    return [(r, "margin")] + ([(r - 1, "select")] if accumulate else [])


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


def select_pool(pairs: pd.DataFrame, cfg, seed: int, policy_path=None, device=None) -> pd.DataFrame:
    """`select` as the config says, computing REAL's similarities first when metric=real (policy_path: π_r)."""
    sel = cfg.selection
    if sel.metric == "real" and "real_similarity" not in pairs:
        from ..embeddings import pair_similarity

        pairs = pairs.assign(real_similarity=pair_similarity(pairs, cfg, policy_path, device))
    return select(pairs, sel.metric, sel.weight, sel.top_k, sel.ratio, seed=seed, signed=sel.signed)


def dataset_card(ctx, selected: pd.DataFrame, pool: int) -> str:
    """HF dataset-card text: YAML header (what `datasets` reads) and how the pairs were made."""
    cfg = ctx.cfg
    sel = cfg.selection
    weight = f"{float(selected['map_weight'].iloc[0]):.3g}" if "map_weight" in selected and len(selected) else sel.weight
    term = "Δim" if sel.signed else "|Δim|"
    how = {"map": f"MAP alignment potential z(Δex) − {weight}·z({term}) (arXiv 2503.01864"
                  + (", w set by selection.weight=auto)" if sel.weight == "auto" else ")"),
           "real": "least similar chosen/rejected response embeddings (REAL, arXiv 2409.17169)",
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


def accumulated(ctx) -> pd.DataFrame:
    """Earlier rounds' kept pairs (round r−1's selected.parquet holds its own predecessors), rescored under π_r:
    their log-probs become π_r's (the DPO reference of this round) and their Δim the current policy's."""
    from .margin import compute_margins

    earlier = ctx.read_parquet("selected.parquet", r=ctx.round - 1)
    if earlier.empty:
        return earlier
    # Prompt ids may repeat across rounds (a prompt file wraps around): key responses by round as well.
    keyed = earlier.assign(prompt_id=earlier["round"].astype(str) + "/" + earlier["prompt_id"].astype(str))
    rescored = compute_margins(keyed, ctx.cfg, ctx.policy_path(), ctx.device, f"round {ctx.round} earlier pairs")
    return rescored.assign(prompt_id=earlier["prompt_id"].to_numpy())


def run(ctx) -> None:
    sel = ctx.cfg.selection
    pairs = ctx.read_parquet("pairs.parquet")
    if sel.top_k is not None and sel.top_k > len(pairs):
        # Ties (or dropped truncated pairs) left fewer pairs than asked for; a start-up check refuses a top_k
        # that no pool could meet.
        log.warning("round %d: selection.top_k=%d exceeds this round's pool of %d pairs (ties and truncated pairs are "
                    "dropped); keeping all of them", ctx.round, sel.top_k, len(pairs))
    selected = select_pool(pairs, ctx.cfg, round_seed(ctx.cfg.seed, ctx.round), ctx.policy_path(), ctx.device)
    selected["round"] = ctx.round
    kept_now = len(selected)
    if sel.accumulate and ctx.round > 0:
        selected = pd.concat([selected, accumulated(ctx)], ignore_index=True)
    selected.to_parquet(ctx.out / "selected.parquet", index=False)
    (ctx.out / "README.md").write_text(dataset_card(ctx, selected, len(pairs)))
    now = selected.head(kept_now)
    ctx.stats.update(pool=len(pairs), selected=kept_now, metric=sel.metric,
                     short_of_top_k=max(sel.top_k - len(pairs), 0) if sel.top_k is not None else 0,
                     mean_margin_explicit_selected=round(float(now["margin_explicit"].mean()), 4) if kept_now else None,
                     mean_abs_margin_implicit_selected=round(float(now["margin_implicit"].abs().mean()), 4) if kept_now else None)
    if sel.metric == "map" and len(pairs):
        ctx.stats["map_weight"] = round(float(resolve_weight(pairs, sel.weight, sel.signed)), 4)
    if sel.accumulate:
        ctx.stats["training_pairs"] = len(selected)
