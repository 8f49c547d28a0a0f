"""The hf sampler's batching, side by side in one process on the embedded default policy: prompts length-sorted
within windows of --window-batches batches (what the generate stage does with `sampler.sort_window_batches`, 16 by
default: a window is the unit a shard takes), sorted over the whole list (what eval does), and not sorted at all.

    .venv/bin/python bench/bench_hf_batching.py [--prompts 96] [--window-batches 4] [--n 1] [--batch-size 16]

Greedy by default (the eval stage's setting); --n 4 --sample for the generate stage's. Prints responses/s and
tokens/s of both, and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--window-batches", type=int, default=4)
    ap.add_argument("--sample", action="store_true", help="sample (T 0.8, top-p 0.95) instead of greedy")
    args = ap.parse_args()

    from selfplay.backends.chat import generation_prompt_ids
    from selfplay.backends.default_model import ensure_default_policy
    from selfplay.backends.samplers import SamplingSpec
    from selfplay.backends.samplers.hf import HFSampler
    from selfplay.rewards.ifeval import build_prompts

    torch.set_num_threads(torch.get_num_threads())
    sampler = HFSampler(ensure_default_policy(), "float32", torch.device("cpu"))
    prompts = [r["prompt"] for r in build_prompts(args.prompts, seed=7)]
    lengths = [len(generation_prompt_ids(sampler.tokenizer, p)) for p in prompts]
    def spec(window: int) -> SamplingSpec:
        return SamplingSpec(n=args.n, max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95,
                            greedy=not args.sample, seed=3, batch_size=args.batch_size, sort_window=window)

    print(f"{len(prompts)} prompts of {min(lengths)}–{max(lengths)} tokens, n={args.n}, batch {args.batch_size}, "
          f"{'sampled' if args.sample else 'greedy'}, {args.max_new_tokens} new tokens max, "
          f"{torch.get_num_threads()} threads")
    results = {}
    windows = {"file order": args.batch_size,  # a window of one batch: nothing is reordered across batches
               f"windows of {args.window_batches} batches": args.batch_size * args.window_batches,
               "whole list sorted": 0}
    for name, window in windows.items():
        started = time.perf_counter()
        out = sampler(prompts, spec(window), desc=name)
        seconds = time.perf_counter() - started
        tokens = sum(c.n_tokens for c in out)
        results[name] = (seconds, tokens)
        print(f"{name:>20}: {seconds:7.1f} s  {len(out) / seconds:6.2f} resp/s  {tokens / seconds:7.1f} tok/s  "
              f"({tokens} tokens)")
    base = results["file order"][0]
    for name in windows:
        print(f"{name:>20}: {results[name][0] / base:.3f}× the file-order time")


if __name__ == "__main__":
    main()
