"""The comparison's statistics (selfplay/core/stats.py) on synthetic arms whose true difference is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from selfplay.core.stats import minimum_detectable_difference, paired_difference, two_level_bootstrap


def _rewards(rng, seeds: int, prompts: int) -> np.ndarray:
    """Held-out rewards shaped like the IFEval judge's (thirds in [0, 1]) plus what a seed's data does to them all."""
    base = rng.choice([0, 1 / 3, 2 / 3, 1], size=(seeds, prompts), p=[0.4, 0.25, 0.2, 0.15])
    return base + rng.normal(0, 0.01, size=(seeds, 1))


def _table(arms: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = [{"arm": arm, "seed": s, "prompt_id": f"p{p}", "reward": float(r[s, p])}
            for arm, r in arms.items() for s in range(r.shape[0]) for p in range(r.shape[1])]
    return pd.DataFrame(rows)


def test_an_arm_built_better_by_005_is_called_better():
    rng = np.random.default_rng(0)
    base = rng.choice([0, 1 / 3, 2 / 3], size=(5, 200), p=[0.45, 0.35, 0.2])  # room for a third more everywhere
    better = base + (rng.random(base.shape) < 0.15) / 3  # +0.05 in expectation
    d = paired_difference(_table({"map": better, "random": base}), "map", "random")
    assert d.ci95_low > 0 and d.verdict().startswith("better than random by +0.0")
    assert d.ci95_low <= 0.05 <= d.ci95_high
    assert d.mdd < 0.03  # 5 seeds × 200 prompts resolve differences of this size


def test_two_identical_arms_are_indistinguishable():
    rng = np.random.default_rng(1)
    same = _rewards(rng, 5, 200)
    d = paired_difference(_table({"map": same, "random": same.copy()}), "map", "random")
    assert d.estimate == 0 and d.ci95_low == 0 == d.ci95_high
    noisy = paired_difference(_table({"map": _rewards(np.random.default_rng(2), 5, 200),
                                      "random": _rewards(np.random.default_rng(3), 5, 200)}), "map", "random")
    assert noisy.ci95_low < 0 < noisy.ci95_high
    assert noisy.verdict().startswith(f"no difference from random detectable beyond ±{noisy.mdd:.3f}")


def test_the_interval_covers_the_true_difference_at_about_its_nominal_rate():
    rng = np.random.default_rng(4)
    true, draws, covered = 0.04, 200, 0
    for i in range(draws):
        seed_effect = rng.normal(0, 0.015, size=(5, 1))
        noise = rng.choice([-1 / 3, 0, 0, 0, 1 / 3], size=(5, 200))
        covered += _covers(two_level_bootstrap(true + seed_effect + noise, draws=800, seed=i), true)
    assert 0.88 <= covered / draws <= 0.99, covered / draws


def _covers(boot: np.ndarray, true: float) -> bool:
    low, high = np.quantile(boot, [0.025, 0.975])
    return bool(low <= true <= high)


def test_minimum_detectable_difference_is_2_8_standard_errors():
    assert minimum_detectable_difference(0.01) == pytest.approx(0.028016, abs=1e-6)


def test_only_shared_seeds_and_prompts_are_paired():
    table = _table({"a": np.full((3, 4), 0.5), "b": np.full((2, 3), 0.25)})
    d = paired_difference(table, "a", "b")
    assert (d.seeds, d.prompts, d.estimate) == (2, 3, 0.25)
