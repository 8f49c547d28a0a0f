"""Pairing: which two of a prompt's scored samples form a preference pair. Pure functions on arrays; the pair stage
(selfplay/stages/pair.py) turns the positions they return into rows with messages.

Every function takes one entry per sample — the prompt it answers (`prompt_ids`), its index among that prompt's
samples (`sample_idx`) and the judge's `reward` — and returns `(chosen, rejected, ties)`: positions into those arrays,
pairs in prompt order (sorted prompt ids) then sample order, and how many prompts gave no pair because all their
samples lie within `min_margin` of each other.

    all          every two samples whose rewards differ by more than min_margin, the higher one chosen
    best_worst   chosen = highest reward (lowest sample index among equals), rejected = lowest (highest index)
    best_random  chosen = highest reward, rejected = a seeded random sample with a reward lower by > min_margin
    best_mu2sigma  chosen = highest reward, rejected = the sample whose reward is nearest μ − 2σ of the prompt's
                 rewards (population σ), among those lower by > min_margin: "Finding the Sweet Spot"
                 (arXiv 2502.16825) found that rejected point better than the minimum as N grows. With N ≤ 5 samples
                 no reward can lie below μ − 2σ (the minimum is ≥ μ − σ·√(N−1)), so it pairs as best_worst does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd

STRATEGIES = ("all", "best_worst", "best_random", "best_mu2sigma")

Pairs = tuple[np.ndarray, np.ndarray, int]


def _groups(prompt_ids, sample_idx) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(codes, order, starts, sizes): each sample's prompt number (prompts sorted), positions sorted by prompt then
    sample index, and where each prompt's run starts in that order and how long it is."""
    codes, firsts = pd.factorize(pd.Series(np.asarray(prompt_ids, dtype=object)), sort=True)
    order = np.lexsort((np.asarray(sample_idx), codes))
    sizes = np.bincount(codes, minlength=len(firsts))
    return codes, order, (np.cumsum(sizes) - sizes).astype(np.int64), sizes


def _each_prompt(prompt_ids, sample_idx) -> Iterator[np.ndarray]:
    """The positions of each prompt's samples, in sample order, prompts in sorted order."""
    _, order, starts, sizes = _groups(prompt_ids, sample_idx)
    for start, size in zip(starts, sizes, strict=True):
        if size:
            yield order[start:start + size]


def all_pairs(prompt_ids, sample_idx, reward, min_margin: float = 0.0) -> Pairs:
    """Every two samples of a prompt whose rewards differ by more than min_margin. Vectorised: one array operation
    per group size."""
    codes, order, starts, sizes = _groups(prompt_ids, sample_idx)
    left, right = [], []
    for k in np.unique(sizes[sizes > 1]):
        i, j = np.triu_indices(k, 1)
        base = starts[sizes == k][:, None]
        left.append((base + i).ravel())
        right.append((base + j).ravel())
    a = np.concatenate(left) if left else np.zeros(0, np.int64)
    b = np.concatenate(right) if right else np.zeros(0, np.int64)
    keep_order = np.lexsort((b, a))  # a's prompt first, then its sample order (positions are in sorted order)
    a, b = order[a[keep_order]], order[b[keep_order]]
    reward = np.asarray(reward)
    keep = np.abs(reward[a] - reward[b]) > min_margin
    a, b = a[keep], b[keep]
    a_wins = reward[a] > reward[b]
    chosen, rejected = np.where(a_wins, a, b), np.where(a_wins, b, a)
    return chosen, rejected, int((sizes > 0).sum()) - len(np.unique(codes[chosen]))


def _best_against(prompt_ids, sample_idx, reward, min_margin: float,
                  pick: Callable[[np.ndarray, np.ndarray], int]) -> Pairs:
    """One pair per prompt: its highest reward (the lowest sample index among equals) against the sample `pick`
    chooses from those lower by > min_margin (`pick(lower_rewards, prompt_rewards)` → a position into `lower`, which
    is in sample order); a prompt with no such sample is a tie."""
    reward = np.asarray(reward, dtype=np.float64)
    chosen, rejected, ties = [], [], 0
    for rows in _each_prompt(prompt_ids, sample_idx):
        values = reward[rows]
        best = rows[np.argmax(values)]
        lower = rows[values[np.argmax(values)] - values > min_margin]
        if not len(lower):
            ties += 1
            continue
        chosen.append(best)
        rejected.append(lower[pick(reward[lower], values)])
    return np.asarray(chosen, np.int64), np.asarray(rejected, np.int64), ties


def best_worst(prompt_ids, sample_idx, reward, min_margin: float = 0.0) -> Pairs:
    """One pair per prompt: its highest reward against its lowest. Equal rewards are broken by sample index (the
    lowest index is chosen, the highest rejected), so the result depends only on the data."""
    return _best_against(prompt_ids, sample_idx, reward, min_margin,
                         lambda lower, _: len(lower) - 1 - int(np.argmin(lower[::-1])))


def best_random(prompt_ids, sample_idx, reward, min_margin: float = 0.0,
                rng: np.random.Generator | None = None) -> Pairs:
    """One pair per prompt: its highest reward against a seeded random one of the samples lower by > min_margin."""
    rng = rng if rng is not None else np.random.default_rng(0)
    return _best_against(prompt_ids, sample_idx, reward, min_margin, lambda lower, _: int(rng.integers(len(lower))))


def best_mu2sigma(prompt_ids, sample_idx, reward, min_margin: float = 0.0) -> Pairs:
    """One pair per prompt: its highest reward against the sample nearest μ − 2σ of its rewards (σ with ddof 0),
    among those lower by > min_margin. Equally near: the lower reward, then the highest sample index (as
    best_worst's rejected)."""
    def nearest(lower: np.ndarray, values: np.ndarray) -> int:
        target = values.mean() - 2 * values.std()
        # lexsort's last key sorts first: distance to the target, then reward, then the later sample first
        return int(np.lexsort((-np.arange(len(lower)), lower, np.abs(lower - target)))[0])

    return _best_against(prompt_ids, sample_idx, reward, min_margin, nearest)


def make_pairs(prompt_ids, sample_idx, reward, strategy: str = "best_worst", min_margin: float = 0.0,
               seed: int | np.random.Generator = 0) -> Pairs:
    """Pairs by `strategy`. `seed` may be a Generator carried across calls (the pair stage's windows share one)."""
    if strategy == "all":
        return all_pairs(prompt_ids, sample_idx, reward, min_margin)
    if strategy == "best_worst":
        return best_worst(prompt_ids, sample_idx, reward, min_margin)
    if strategy == "best_mu2sigma":
        return best_mu2sigma(prompt_ids, sample_idx, reward, min_margin)
    if strategy == "best_random":
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return best_random(prompt_ids, sample_idx, reward, min_margin, rng)
    raise ValueError(f"unknown pair strategy {strategy!r}; strategies are {', '.join(STRATEGIES)}")


def flip_labels(count: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Which of `count` pairs a noisy judge gets the wrong way round: each independently with probability
    `fraction`, drawn one uniform a pair from `rng` (a generator carried across a stage's windows gives the same
    flips however the pairs are windowed)."""
    return rng.random(count) < fraction

