"""Small fast rewards for the benchmarks (`reward.function=rewards_for_bench:<name>`, with bench/ on PYTHONPATH)."""

import zlib


def response_length(prompts, completions, **columns):
    return [len(c) / 100.0 for c in completions]


def words_and_hash(prompts, completions, **columns):
    """The completion's word count plus a fraction in [0, 1) from the crc32 of its text: one pass over each text,
    and two different responses tie only when both their word counts and their crc32s agree (bench_data_rss.py)."""
    return [c.count(" ") + 1 + zlib.crc32(c.encode()) / 2**32 for c in completions]
