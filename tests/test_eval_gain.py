"""The held-out gain's statistics (selfplay/core/stats.py `paired_gain`) against hand-computed values."""

import numpy as np
import pytest

from selfplay.core.stats import paired_gain


def test_exact_sign_flip_p_value_and_interval():
    # 5 prompts improve by 1/3, 95 tie: of the 2^5 sign patterns only all-plus and all-minus reach |sum| = 5/3
    diff = np.array([1 / 3] * 5 + [0.0] * 95)
    got = paired_gain(diff)
    assert got["reward_gain_p_value"] == pytest.approx(2 / 32)
    se = diff.std(ddof=1) / 10
    assert got["reward_gain_vs_base"] == pytest.approx(5 / 300)
    assert got["reward_gain_stderr"] == pytest.approx(se)
    assert got["reward_gain_ci95_low"] == pytest.approx(5 / 300 - 1.96 * se)
    assert got["reward_gain_ci95_high"] == pytest.approx(5 / 300 + 1.96 * se)


def test_balanced_differences_are_not_significant_and_a_clear_gain_is():
    assert paired_gain(np.array([0.5, -0.5] * 10))["reward_gain_p_value"] == 1.0
    assert paired_gain(np.zeros(50))["reward_gain_p_value"] == 1.0
    clear = paired_gain(np.array([1 / 3] * 40 + [-1 / 3] * 10 + [0.0] * 150), seed=3)
    # sign test: P(|wins − 25| ≥ 15) for 50 fair coins ≈ 3e-5, below the Monte Carlo floor of 1/20001
    assert clear["reward_gain_p_value"] == pytest.approx(1 / 20_001)
    assert clear["reward_gain_ci95_low"] > 0
