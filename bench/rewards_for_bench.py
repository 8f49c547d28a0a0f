"""A small fast reward for the benchmarks (`reward.function=rewards_for_bench:response_length`)."""


def response_length(prompts, completions, **columns):
    return [len(c) / 100.0 for c in completions]
