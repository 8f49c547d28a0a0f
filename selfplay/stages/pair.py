"""pair — preference pairs from each prompt's scored samples; ties dropped and counted.

Strategies (pair.strategy): all (the default: every two samples whose rewards differ by more than pair.min_margin,
the higher one chosen), best_worst (chosen = highest reward, rejected = lowest), best_random (chosen = highest,
rejected = a seeded random sample with a lower reward).

Input:   round_XX/scores/part-*.parquet
Output:  round_XX/candidate_pairs.parquet
         prompt_id, prompt, chosen, rejected (TRL's conversational preference format: lists of messages),
         chosen_sample_idx, rejected_sample_idx, reward_chosen, reward_rejected, margin_explicit (Δex)
Alone:   selfplay stage pair round=R
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from selfplay.backends.chat import prompt_messages, response_messages
from selfplay.config import round_seed

OUTPUTS = ("candidate_pairs.parquet",)
CONFIG = ("pair", "seed")


def requires(r: int, cfg=None) -> list[tuple[int, str]]:
    return [(r, "score")]


def best_vs_worst(scores: pd.DataFrame, min_margin: float = 0.0) -> tuple[pd.DataFrame, int]:
    """One pair per prompt from its highest- and lowest-reward samples; returns (pairs, prompts dropped as ties).

    Equal rewards are broken by sample index (the lowest index wins `chosen`, the highest is `rejected`), so the
    result depends only on the data. A prompt whose best and worst differ by ≤ min_margin is a tie.
    """
    rows = []
    ties = 0
    for prompt_id, group in scores.groupby("prompt_id", sort=True):
        group = group.sort_values("sample_idx")
        best = group.loc[group["reward"].idxmax()]  # idxmax/idxmin take the first occurrence
        worst = group.loc[group["reward"][::-1].idxmin()]
        margin = float(best["reward"] - worst["reward"])
        if margin <= min_margin:
            ties += 1
            continue
        rows.append(_pair_row(prompt_id, best, worst))
    return pd.DataFrame(rows, columns=COLUMNS), ties


COLUMNS = ["prompt_id", "prompt", "chosen", "rejected", "chosen_sample_idx", "rejected_sample_idx",
           "reward_chosen", "reward_rejected", "margin_explicit"]


def _pair_row(prompt_id, better: pd.Series, worse: pd.Series) -> dict:
    return {"prompt_id": prompt_id, "prompt": prompt_messages(better["prompt"]),
            "chosen": response_messages(better["response"]), "rejected": response_messages(worse["response"]),
            "chosen_sample_idx": int(better["sample_idx"]), "rejected_sample_idx": int(worse["sample_idx"]),
            "reward_chosen": float(better["reward"]), "reward_rejected": float(worse["reward"]),
            "margin_explicit": float(better["reward"] - worse["reward"])}


def make_pairs(scores: pd.DataFrame, strategy: str = "best_worst", min_margin: float = 0.0,
               seed: int = 0) -> tuple[pd.DataFrame, int]:
    """Pairs by `strategy`; returns (pairs, prompts that gave none: all their samples within min_margin)."""
    if strategy == "best_worst":
        return best_vs_worst(scores, min_margin)
    rng = np.random.default_rng(seed)
    rows, ties = [], 0
    for prompt_id, group in scores.groupby("prompt_id", sort=True):
        group = group.sort_values("sample_idx").reset_index(drop=True)
        before = len(rows)
        if strategy == "best_random":
            best = group.loc[group["reward"].idxmax()]
            lower = group[best["reward"] - group["reward"] > min_margin]
            if len(lower):
                rows.append(_pair_row(prompt_id, best, lower.iloc[int(rng.integers(len(lower)))]))
        else:  # all: i before j in sample order, the higher reward chosen
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    a, b = group.iloc[i], group.iloc[j]
                    if abs(a["reward"] - b["reward"]) > min_margin:
                        rows.append(_pair_row(prompt_id, *((a, b) if a["reward"] > b["reward"] else (b, a))))
        ties += len(rows) == before
    return pd.DataFrame(rows, columns=COLUMNS), ties


def run(ctx) -> None:
    scores = ctx.read_parquet("scores")
    pairs, ties = make_pairs(scores, ctx.cfg.pair.strategy, ctx.cfg.pair.min_margin,
                             seed=round_seed(ctx.cfg.seed, ctx.round))
    pairs.to_parquet(ctx.out / "candidate_pairs.parquet", index=False)
    n_prompts = int(scores["prompt_id"].nunique())
    ctx.stats.update(prompts=n_prompts, pairs=len(pairs), ties_dropped=ties, strategy=ctx.cfg.pair.strategy,
                     mean_margin_explicit=round(float(pairs["margin_explicit"].mean()), 4) if len(pairs) else None)
