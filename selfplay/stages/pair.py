"""pair — preference pairs from each prompt's scored samples; ties dropped and counted.

Strategies (pair.strategy): all (the default: every two samples whose rewards differ by more than pair.min_margin,
the higher one chosen), best_worst (chosen = highest reward, rejected = lowest), best_random (chosen = highest,
rejected = a seeded random sample with a lower reward).

Input:   round_XX/scores/part-*.parquet
Output:  round_XX/candidate_pairs.parquet   (written window by window of whole prompts: selfplay/rundir/tables.py)
         prompt_id, prompt, chosen, rejected (TRL's conversational preference format: lists of messages),
         chosen_sample_idx, rejected_sample_idx, reward_chosen, reward_rejected, margin_explicit (Δex)
Alone:   selfplay stage pair round=R
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from selfplay.backends.chat import prompt_messages, response_messages
from selfplay.config import round_seed
from selfplay.rundir import tables

OUTPUTS = ("candidate_pairs.parquet",)
# Pairs are made per prompt, and a window holds whole prompts: its size bounds memory, not the pairs.
UNKEYED = ("window_rows",)
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


def all_pairs(scores: pd.DataFrame, min_margin: float = 0.0) -> tuple[pd.DataFrame, int]:
    """Every two samples of a prompt whose rewards differ by more than min_margin, the higher one chosen; pairs in
    prompt order (first appearance), then sample order (i before j). Vectorised: one array operation per group size."""
    scores = scores.sort_values(["prompt_id", "sample_idx"], kind="stable")
    codes, firsts = pd.factorize(scores["prompt_id"], sort=True)
    sizes = np.bincount(codes, minlength=len(firsts))
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    left, right = [], []
    for k in np.unique(sizes[sizes > 1]):
        i, j = np.triu_indices(k, 1)
        base = starts[sizes == k][:, None]
        left.append((base + i).ravel())
        right.append((base + j).ravel())
    a = np.concatenate(left) if left else np.zeros(0, np.int64)
    b = np.concatenate(right) if right else np.zeros(0, np.int64)
    order = np.lexsort((b, a))  # row a's prompt comes first, then its sample order
    a, b = a[order], b[order]
    reward = scores["reward"].to_numpy()
    keep = np.abs(reward[a] - reward[b]) > min_margin
    a, b = a[keep], b[keep]
    a_wins = reward[a] > reward[b]
    chosen, rejected = np.where(a_wins, a, b), np.where(a_wins, b, a)
    ties = int((sizes > 0).sum() - len(np.unique(codes[chosen])))
    return pair_frame(scores, chosen, rejected), ties


def pair_frame(scores: pd.DataFrame, chosen: np.ndarray, rejected: np.ndarray) -> pd.DataFrame:
    """The COLUMNS of pairs given by row positions into `scores`."""
    prompt, response = scores["prompt"].to_numpy(), scores["response"].to_numpy()
    ids, samples, rewards = scores["prompt_id"].to_numpy(), scores["sample_idx"].to_numpy(), scores["reward"].to_numpy()
    return pd.DataFrame({
        "prompt_id": ids[chosen], "prompt": [prompt_messages(p) for p in prompt[chosen]],
        "chosen": [response_messages(r) for r in response[chosen]],
        "rejected": [response_messages(r) for r in response[rejected]],
        "chosen_sample_idx": samples[chosen].astype(np.int64), "rejected_sample_idx": samples[rejected].astype(np.int64),
        "reward_chosen": rewards[chosen].astype(np.float64), "reward_rejected": rewards[rejected].astype(np.float64),
        "margin_explicit": (rewards[chosen] - rewards[rejected]).astype(np.float64)}, columns=COLUMNS)


def make_pairs(scores: pd.DataFrame, strategy: str = "best_worst", min_margin: float = 0.0,
               seed: int | np.random.Generator = 0) -> tuple[pd.DataFrame, int]:
    """Pairs by `strategy`, in prompt_id order; returns (pairs, prompts that gave none: all their samples within
    min_margin). `seed` may be a Generator carried across calls (the stage's windows share one)."""
    if strategy == "best_worst":
        return best_vs_worst(scores, min_margin)
    if strategy == "all":
        return all_pairs(scores, min_margin)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    rows, ties = [], 0
    for prompt_id, group in scores.groupby("prompt_id", sort=True):
        group = group.sort_values("sample_idx").reset_index(drop=True)
        best = group.loc[group["reward"].idxmax()]
        lower = group[best["reward"] - group["reward"] > min_margin]
        if len(lower):
            rows.append(_pair_row(prompt_id, best, lower.iloc[int(rng.integers(len(lower)))]))
        else:
            ties += 1
    return pd.DataFrame(rows, columns=COLUMNS), ties


def run(ctx) -> None:
    """Window by window of whole prompts (a prompt's samples are adjacent in scores/), each window's pairs appended
    to candidate_pairs.parquet as they are made."""
    path = ctx.path("scores")
    codes = tables.key_codes(path)
    tables.check_contiguous(codes, path)
    rng = np.random.default_rng(round_seed(ctx.cfg.seed, ctx.round))
    ties = n_pairs = 0
    margin_sum = 0.0
    empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in EMPTY_TYPES.items()})
    with tables.TableWriter(ctx.out / "candidate_pairs.parquet", empty=empty) as out:
        for _, _, scores in tables.iter_windows(path, tables.group_windows(codes, ctx.cfg.window_rows),
                                                columns=["prompt_id", "prompt", "sample_idx", "response", "reward"]):
            pairs, window_ties = make_pairs(scores, ctx.cfg.pair.strategy, ctx.cfg.pair.min_margin, seed=rng)
            out.write(pairs)
            ties, n_pairs = ties + window_ties, n_pairs + len(pairs)
            margin_sum += float(pairs["margin_explicit"].sum())
    n_prompts = int(len(np.unique(codes)))
    ctx.stats.update(prompts=n_prompts, pairs=n_pairs, ties_dropped=ties, strategy=ctx.cfg.pair.strategy,
                     mean_margin_explicit=round(margin_sum / n_pairs, 4) if n_pairs else None)


# Column types of a pool with no pairs (every prompt a tie), so the empty file still has the documented columns.
EMPTY_TYPES = {"prompt_id": object, "prompt": object, "chosen": object, "rejected": object,
               "chosen_sample_idx": "int64", "rejected_sample_idx": "int64", "reward_chosen": "float64",
               "reward_rejected": "float64", "margin_explicit": "float64"}
