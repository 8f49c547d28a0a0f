"""Statistics on per-prompt held-out rewards, pure functions: one policy against π_0 (the eval stage's win rate and
paired gain, at the end of this file) and a comparison of selection arms.

The design a comparison runs is seeds × held-out prompts: every arm of one seed shares that seed's round-0 data, and
every run answers the same held-out prompts. The difference between two arms is taken per (seed, prompt), so the
shared noise cancels, and its uncertainty comes from a two-level bootstrap: resample the seeds, then the prompts within
each resampled seed. That reflects both sources of noise — which data a seed drew (the run-to-run spread) and which
prompts the eval asked — without assuming a shape for the differences, which are mostly 0 with a few thirds.

    table = long frame with columns  arm, seed, prompt_id, reward   (π_0 as arm "base" when gains are wanted)
    paired_difference(table, "map-w1", "random")  → estimate, 95% interval, bootstrap s.e.
    minimum_detectable_difference(stderr)         → the true difference this design finds 80% of the time
    verdict(...)                                  → "better than random by …" / "worse …" / "no difference …"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

Z_975 = 1.959963984540054  # two-sided 5% test
Z_80 = 0.8416212335729143  # 80% power


@dataclass(frozen=True)
class Difference:
    """arm − versus, averaged over seeds and prompts, with its two-level bootstrap interval."""

    arm: str
    versus: str
    estimate: float
    ci95_low: float
    ci95_high: float
    stderr: float
    seeds: int
    prompts: int

    @property
    def mdd(self) -> float:
        return minimum_detectable_difference(self.stderr)

    def verdict(self) -> str:
        return verdict(self)

    def as_dict(self) -> dict:
        return {"arm": self.arm, "versus": self.versus, "estimate": self.estimate, "ci95": [self.ci95_low, self.ci95_high],
                "stderr": self.stderr, "mdd_80": self.mdd, "seeds": self.seeds, "prompts": self.prompts,
                "verdict": self.verdict()}


def difference_matrix(table: pd.DataFrame, arm: str, versus: str) -> np.ndarray:
    """seeds × prompts of arm's reward minus versus' on the same (seed, prompt); the seeds and prompts both arms have."""
    def wide(name: str) -> pd.DataFrame:
        mine = table[table["arm"] == name]
        return mine.pivot_table(index="seed", columns="prompt_id", values="reward", aggfunc="mean")

    a, b = wide(arm), wide(versus)
    seeds = a.index.intersection(b.index)
    prompts = a.columns.intersection(b.columns)
    return (a.loc[seeds, prompts] - b.loc[seeds, prompts]).to_numpy(dtype=float)


def two_level_bootstrap(diff: np.ndarray, draws: int = 4000, seed: int = 0) -> np.ndarray:
    """Bootstrap means of a seeds × prompts matrix: seeds resampled with replacement, then prompts within each."""
    rng = np.random.default_rng(seed)
    n_seeds, n_prompts = diff.shape
    seed_idx = rng.integers(0, n_seeds, size=(draws, n_seeds))
    prompt_idx = rng.integers(0, n_prompts, size=(draws, n_seeds, n_prompts))
    picked = diff[seed_idx[:, :, None], prompt_idx]  # draws × seeds × prompts
    return picked.mean(axis=(1, 2))


def paired_difference(table: pd.DataFrame, arm: str, versus: str, draws: int = 4000, seed: int = 0) -> Difference:
    diff = difference_matrix(table, arm, versus)
    if diff.size == 0:
        raise ValueError(f"no (seed, prompt) that both {arm} and {versus} have")
    boot = two_level_bootstrap(diff, draws, seed)
    low, high = np.quantile(boot, [0.025, 0.975])
    return Difference(arm=arm, versus=versus, estimate=float(diff.mean()), ci95_low=float(low), ci95_high=float(high),
                      stderr=float(boot.std(ddof=1)), seeds=diff.shape[0], prompts=diff.shape[1])


def minimum_detectable_difference(stderr: float, alpha_z: float = Z_975, power_z: float = Z_80) -> float:
    """The true difference a two-sided 5% test of this s.e. detects with 80% power: (z_0.975 + z_0.8)·s.e. ≈ 2.8 s.e."""
    return (alpha_z + power_z) * stderr


def verdict(d: Difference) -> str:
    """One line: better / worse when the 95% interval excludes 0, else how large a difference the design could see."""
    interval = f"[{d.ci95_low:+.3f}, {d.ci95_high:+.3f}]"
    if d.ci95_low > 0:
        return f"better than {d.versus} by {d.estimate:+.3f} {interval}"
    if d.ci95_high < 0:
        return f"worse than {d.versus} by {d.estimate:+.3f} {interval}"
    return f"no difference from {d.versus} detectable beyond ±{d.mdd:.3f} ({d.estimate:+.3f} {interval})"


# ---- one policy against π_0 on the same held-out prompts (the eval stage's figures) ----

def win_rate(policy: pd.DataFrame, base: pd.DataFrame) -> dict[str, float]:
    """Per prompt mean reward of the policy vs the base: wins, ties (half a win), losses."""
    a = policy.groupby("prompt_id")["reward"].mean()
    b = base.groupby("prompt_id")["reward"].mean().reindex(a.index)
    wins, ties = int((a > b).sum()), int((a == b).sum())
    losses = len(a) - wins - ties
    return {"wins": wins, "ties": ties, "losses": losses, "win_rate_vs_base": (wins + 0.5 * ties) / len(a)}


def prompt_differences(policy: pd.DataFrame, base: pd.DataFrame) -> pd.Series:
    """Per held-out prompt, the policy's mean reward minus π_0's on the same prompt (both frames: prompt_id, reward)."""
    mine = policy.groupby("prompt_id")["reward"].mean()
    return mine - base.groupby("prompt_id")["reward"].mean().reindex(mine.index)


def paired_gain(diff: np.ndarray, seed: int = 0, draws: int = 20_000) -> dict[str, float]:
    """The gain over π_0 from per-prompt differences: mean, paired s.e., a 95% interval (normal; the held-out set has
    ≥ 100 prompts by default) and the two-sided p-value of a paired sign-flip permutation test (no assumption on the
    shape of the differences, which are mostly 0 and a few thirds): exact over every sign pattern when at most 16
    prompts differ, else `draws` seeded random flips."""
    diff = np.asarray(diff, dtype=float)
    n = len(diff)
    gain = float(diff.mean()) if n else 0.0
    stderr = float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    nonzero = diff[diff != 0]
    observed = abs(nonzero.sum())
    if len(nonzero) == 0:
        p_value = 1.0
    elif len(nonzero) <= 16:
        signs = 1 - 2 * ((np.arange(2 ** len(nonzero))[:, None] >> np.arange(len(nonzero))) & 1)
        p_value = float((np.abs(signs @ nonzero) >= observed - 1e-12).mean())
    else:
        signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(draws, len(nonzero)))
        # the observed sign pattern counts as one of the draws, so p is never 0
        p_value = float(((np.abs(signs @ nonzero) >= observed - 1e-12).sum() + 1) / (draws + 1))
    return {"reward_gain_vs_base": gain, "reward_gain_stderr": stderr, "reward_gain_ci95_low": gain - 1.96 * stderr,
            "reward_gain_ci95_high": gain + 1.96 * stderr, "reward_gain_p_value": p_value}
