"""pair — preference pairs from each prompt's scored samples; ties dropped and counted.

Strategies (pair.strategy; selfplay/core/pairing.py): all (the default: every two samples whose rewards differ by
more than pair.min_margin, the higher one chosen), best_worst (chosen = highest reward, rejected = lowest),
best_random (chosen = highest, rejected = a seeded random sample with a lower reward), best_mu2sigma (chosen =
highest, rejected = the sample nearest μ − 2σ of the prompt's rewards).

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
from selfplay.core import pairing
from selfplay.core.pairing import flip_labels
from selfplay.rundir import tables

OUTPUTS = ("candidate_pairs.parquet",)
# Pairs are made per prompt, and a window holds whole prompts: its size bounds memory, not the pairs.
UNKEYED = ("window_rows",)
CONFIG = ("pair", "seed")


def requires(r: int, cfg=None) -> list[tuple[int, str]]:
    return [(r, "score")]


COLUMNS = ["prompt_id", "prompt", "chosen", "rejected", "chosen_sample_idx", "rejected_sample_idx",
           "reward_chosen", "reward_rejected", "margin_explicit"]


def make_pairs(scores: pd.DataFrame, strategy: str = "best_worst", min_margin: float = 0.0,
               seed: int | np.random.Generator = 0) -> tuple[pd.DataFrame, int]:
    """The COLUMNS of the pairs `strategy` forms from `scores` (prompt_id, prompt, sample_idx, response, reward;
    selfplay/core/pairing.py), and how many prompts gave none."""
    chosen, rejected, ties = pairing.make_pairs(scores["prompt_id"].to_numpy(), scores["sample_idx"].to_numpy(),
                                                scores["reward"].to_numpy(), strategy, min_margin, seed)
    return pair_frame(scores, chosen, rejected), ties


def pair_frame(scores: pd.DataFrame, chosen: np.ndarray, rejected: np.ndarray) -> pd.DataFrame:
    """The COLUMNS of pairs given by row positions into `scores`, in TRL's conversational format."""
    prompt, response = scores["prompt"].to_numpy(), scores["response"].to_numpy()
    ids, samples, rewards = scores["prompt_id"].to_numpy(), scores["sample_idx"].to_numpy(), scores["reward"].to_numpy()
    return pd.DataFrame({
        "prompt_id": ids[chosen], "prompt": [prompt_messages(p) for p in prompt[chosen]],
        "chosen": [response_messages(r) for r in response[chosen]],
        "rejected": [response_messages(r) for r in response[rejected]],
        "chosen_sample_idx": samples[chosen].astype(np.int64), "rejected_sample_idx": samples[rejected].astype(np.int64),
        "reward_chosen": rewards[chosen].astype(np.float64), "reward_rejected": rewards[rejected].astype(np.float64),
        "margin_explicit": (rewards[chosen] - rewards[rejected]).astype(np.float64)}, columns=COLUMNS)


def run(ctx) -> None:
    """Window by window of whole prompts (a prompt's samples are adjacent in scores/), each window's pairs appended
    to candidate_pairs.parquet as they are made."""
    path = ctx.path("scores")
    codes = tables.key_codes(path)
    tables.check_contiguous(codes, path)
    p = ctx.cfg.pair
    rng = np.random.default_rng(round_seed(ctx.cfg.seed, ctx.round))
    # its own stream, so switching the noise on changes which pairs are flipped, not which pairs are made
    noise = np.random.default_rng([round_seed(ctx.cfg.seed, ctx.round), 1]) if p.flip_fraction else None
    ties = n_pairs = flipped = 0
    margin_sum = 0.0
    empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in EMPTY_TYPES.items()})
    if noise is not None:
        empty = empty.assign(label_flipped=pd.Series(dtype=bool))
    with tables.TableWriter(ctx.out / "candidate_pairs.parquet", empty=empty) as out:
        for _, _, scores in tables.iter_windows(path, tables.group_windows(codes, ctx.cfg.window_rows),
                                                columns=["prompt_id", "prompt", "sample_idx", "response", "reward"]):
            pairs, window_ties = make_pairs(scores, p.strategy, p.min_margin, seed=rng)
            if noise is not None:
                pairs = with_flipped_labels(pairs, flip_labels(len(pairs), p.flip_fraction, noise))
                flipped += int(pairs["label_flipped"].sum())
            out.write(pairs)
            ties, n_pairs = ties + window_ties, n_pairs + len(pairs)
            margin_sum += float(pairs["margin_explicit"].sum())
    n_prompts = int(len(np.unique(codes)))
    ctx.stats.update(prompts=n_prompts, pairs=n_pairs, ties_dropped=ties, strategy=p.strategy,
                     mean_margin_explicit=round(margin_sum / n_pairs, 4) if n_pairs else None)
    if noise is not None:
        ctx.stats.update(flip_fraction=p.flip_fraction, labels_flipped=flipped)


def with_flipped_labels(pairs: pd.DataFrame, flip: np.ndarray) -> pd.DataFrame:
    """The pairs with the responses (and sample indices) of the `flip` rows swapped, the judge's rewards and margin
    left as they were, and `label_flipped`."""
    pairs = pairs.copy()
    for a, b in (("chosen", "rejected"), ("chosen_sample_idx", "rejected_sample_idx")):
        pairs.loc[flip, [a, b]] = pairs.loc[flip, [b, a]].to_numpy()
    return pairs.assign(label_flipped=flip)


# Column types of a pool with no pairs (every prompt a tie), so the empty file still has the documented columns.
EMPTY_TYPES = {"prompt_id": object, "prompt": object, "chosen": object, "rejected": object,
               "chosen_sample_idx": "int64", "rejected_sample_idx": "int64", "reward_chosen": "float64",
               "reward_rejected": "float64", "margin_explicit": "float64"}
