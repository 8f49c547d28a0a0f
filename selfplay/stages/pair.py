"""pair — per prompt, chosen = highest reward, rejected = lowest; ties dropped and counted.

Input:   round_XX/scores/part-*.parquet
Output:  round_XX/candidate_pairs.parquet
         prompt_id, prompt, chosen, rejected (TRL's conversational preference format: lists of messages),
         chosen_sample_idx, rejected_sample_idx, reward_chosen, reward_rejected, margin_explicit (Δex)
Alone:   selfplay stage pair round=R
"""

from __future__ import annotations

import pandas as pd

from ..chat import prompt_messages, response_messages

OUTPUTS = ("candidate_pairs.parquet",)
CONFIG = ("pair",)


def requires(r: int) -> list[tuple[int, str]]:
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
        rows.append(
            {
                "prompt_id": prompt_id,
                "prompt": prompt_messages(best["prompt"]),
                "chosen": response_messages(best["response"]),
                "rejected": response_messages(worst["response"]),
                "chosen_sample_idx": int(best["sample_idx"]),
                "rejected_sample_idx": int(worst["sample_idx"]),
                "reward_chosen": float(best["reward"]),
                "reward_rejected": float(worst["reward"]),
                "margin_explicit": margin,
            }
        )
    columns = ["prompt_id", "prompt", "chosen", "rejected", "chosen_sample_idx", "rejected_sample_idx",
               "reward_chosen", "reward_rejected", "margin_explicit"]
    return pd.DataFrame(rows, columns=columns), ties


def run(ctx) -> None:
    scores = ctx.read_parquet("scores")
    pairs, ties = best_vs_worst(scores, ctx.cfg.pair.min_margin)
    pairs.to_parquet(ctx.out / "candidate_pairs.parquet", index=False)
    n_prompts = int(scores["prompt_id"].nunique())
    ctx.stats.update(prompts=n_prompts, pairs=len(pairs), ties_dropped=ties,
                     mean_margin_explicit=round(float(pairs["margin_explicit"].mean()), 4) if len(pairs) else None)
