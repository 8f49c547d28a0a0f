"""Reward functions used by the tests through `reward.function=rewards_for_tests:NAME` (TRL's convention)."""


def response_length(prompts, completions, **columns):
    """Longer is better: a reward that always separates random responses."""
    return [len(c) / 100.0 for c in completions]


def constant(prompts, completions, **columns):
    """Every response ties: no pairs can be formed."""
    return [0.5 for _ in completions]


def not_finite(prompts, completions, **columns):
    return [float("nan")] + [0.0] * (len(completions) - 1)


def infinite(prompts, completions, **columns):
    return [float("inf")] * len(completions)


def wrong_length(prompts, completions, **columns):
    """One reward too few: a bug in a user's function."""
    return [0.0] * (len(completions) - 1)


def returns_none(prompts, completions, **columns):
    """Forgets to return: outside TRL's reward-function contract."""


def returns_scalar(prompts, completions, **columns):
    return 0.5


def raises(prompts, completions, **columns):
    raise KeyError("score_table")


def slow(prompts, completions, **columns):
    """Holds the score stage for two minutes: a run to interrupt, or to try a second writer against."""
    import time

    time.sleep(120)
    return response_length(prompts, completions)
