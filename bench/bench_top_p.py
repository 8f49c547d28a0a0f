"""Sampling throughput of the hf sampler with transformers' TopPLogitsWarper vs selfplay's TemperatureTopP (same temperature + nucleus),
on the embedded default policy, measured side by side in one process.

    .venv/bin/python bench/bench_top_p.py [--prompts 16] [--n 4] [--max-new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from transformers import GenerationConfig

    from selfplay.backends.chat import generation_prompt_ids
    from selfplay.backends.default_model import ensure_default_policy
    from selfplay.backends.samplers.hf import HFSampler, TemperatureTopP
    from selfplay.rewards.ifeval import build_prompts

    sampler = HFSampler(ensure_default_policy(), "float32", torch.device("cpu"))
    tok = sampler.tokenizer
    prompts = [r["prompt"] for r in build_prompts(args.prompts, seed=11)]
    batch = tok.pad({"input_ids": [generation_prompt_ids(tok, p) for p in prompts]}, padding=True,
                    padding_side="left", return_tensors="pt")

    def run(use_fast: bool) -> float:
        cfg = GenerationConfig(do_sample=True, temperature=None if use_fast else 0.8, top_k=0,
                               top_p=None if use_fast else 0.95,
                               max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                               num_return_sequences=args.n, pad_token_id=tok.pad_token_id)
        extra = {"logits_processor": [TemperatureTopP(0.8, 0.95)]} if use_fast else {}
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.inference_mode():
            sampler.model.generate(**batch, generation_config=cfg, **extra)
        return args.prompts * args.n * args.max_new_tokens / (time.perf_counter() - start)

    run(True)  # warm-up
    rates = {"hf_top_p": [], "fast_top_p": []}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        rates["hf_top_p"].append(run(False))
        rates["fast_top_p"].append(run(True))
    hf, fast = max(rates["hf_top_p"]), max(rates["fast_top_p"])
    print(f"{args.prompts} prompts x n={args.n} x {args.max_new_tokens} tokens, fp32, {torch.get_num_threads()} threads")
    print(f"transformers TopPLogitsWarper: {hf:7.1f} tok/s   (runs: {', '.join(f'{r:.1f}' for r in rates['hf_top_p'])})")
    print(f"selfplay TemperatureTopP:      {fast:7.1f} tok/s   (runs: {', '.join(f'{r:.1f}' for r in rates['fast_top_p'])})")
    print(f"ratio fast/hf: {fast / hf:.2f}")


if __name__ == "__main__":
    main()
