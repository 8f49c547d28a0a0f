"""fp32 against bf16 for every stage that runs a model, each against this machine's own peak, measured in one run.

    .venv/bin/python bench/bench_precision.py [--pairs 24] [--prompts 16] [--device cpu|cuda] [--out FILE.json]

First the machine: the best of several 2048³ matrix products in fp32 and in bf16 (GFLOP/s), and the memory
bandwidth of a 512 MiB copy (GB/s: bytes read + written). Then, on the embedded SmolLM2-135M's real weights, each
stage's own code at precision=fp32 and precision=bf16 over the same inputs (interleaved, best of --repeats):

* train step   the train stage's `build_trainer` (TRL DPO, reused reference log-probs computed by the margin stage's
               code under the same precision), 4 pairs a step as the default; seconds per optimizer step (median
               after the first), MFU = 6·N·tokens / time / peak;
* rescoring    the margin stage's `completion_logps` (token-budget batches); MFU = 2·N·tokens / time / peak;
* reward       `ClassifierScorer` on a sequence classifier of the same shape (the embedded default's judge is
               a Python function, so a reward model of the policy's size stands in); MFU as rescoring;
* generation   the hf sampler (`HFSampler`) sampling 4 responses of ≤ 96 tokens per prompt, as the default;
               MFU of 2·N per generated token, and the share of the memory-bandwidth bound: every decode step reads
               the weights once (N·bytes at the precision's weight width), for all the batch's rows at once.

N counts every parameter once (SmolLM2's tied embedding is the LM head's matrix). The peak is the one measured in
this run at the same precision: "MFU vs bf16 peak" for the bf16 column, "vs fp32 peak" for the fp32 column, and for
bf16 also against the fp32 peak. Attention's own FLOPs (sequence² terms) are left out, as usual; at ≤ 300 tokens they
are a few percent.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_scoring import random_texts, timed
from bench_train_reuse import StepClock


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 6) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    return 2 * n**3 / min(timed(lambda: a @ b) for _ in range(repeats)) / 1e9


def memory_bandwidth(device: torch.device, mib: int = 512, repeats: int = 6) -> float:
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() * 4 / min(timed(lambda: dst.copy_(src)) for _ in range(repeats)) / 1e9


def compose_cfg(precision: str, device: str, extra: list[str] = ()):
    from hydra import compose, initialize_config_dir

    from selfplay.config import conf_dir, register

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=[f"precision={precision}", f"device={device}", "model.dtype=float32",
                                            *extra])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=24, help="DPO pairs (6 optimizer steps of 4)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts for the generation measurement (× 4 samples)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()

    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from selfplay.backends.batching import token_budget_batches
    from selfplay.backends.chat import prompt_messages, response_messages, reward_input_ids, training_tokens
    from selfplay.backends.default_model import ensure_default_policy
    from selfplay.backends.logprobs import completion_logps
    from selfplay.backends.modeling import load_tokenizer
    from selfplay.backends.precision import native_bf16
    from selfplay.backends.samplers import SamplingSpec
    from selfplay.backends.samplers.hf import HFSampler
    from selfplay.rewards.ifeval import build_prompts
    from selfplay.rewards.scoring import ClassifierScorer
    from selfplay.stages.train import build_trainer

    device = torch.device(args.device)
    policy_dir = ensure_default_policy()
    tokenizer = load_tokenizer(policy_dir)
    _, found = native_bf16(device)
    peak = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    bandwidth = memory_bandwidth(device)
    print(f"device {args.device} ({found}), threads {torch.get_num_threads()}")
    print(f"peak: fp32 {peak['fp32']:,.0f} GFLOP/s, bf16 {peak['bf16']:,.0f} GFLOP/s "
          f"({peak['bf16'] / peak['fp32']:.2f}x); memory bandwidth {bandwidth:,.1f} GB/s")

    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32, use_safetensors=True).to(device)
    policy.eval()
    n_params = sum(p.numel() for p in policy.parameters())
    rng = random.Random(0)
    # Default-like texts: the built-in tasks as prompts; responses of 24–96 tokens (the default's cap is 96).
    prompts = [row["prompt"] for row in build_prompts(args.pairs, seed=0)]
    chosen = random_texts(tokenizer, args.pairs, 24, 96, rng)
    rejected = random_texts(tokenizer, args.pairs, 24, 96, rng)
    seqs = [training_tokens(tokenizer, p, c, "dpo", 512) for p, c in zip(prompts, chosen, strict=True)]
    seqs += [training_tokens(tokenizer, p, r, "dpo", 512) for p, r in zip(prompts, rejected, strict=True)]
    rescoring_tokens = sum(len(a) + len(b) for a, b in seqs)
    batches = token_budget_batches([len(a) + len(b) for a, b in seqs], 16, 8192)
    results: dict[str, dict[str, dict[str, float]]] = {}

    def rescore(bf16: bool):
        return completion_logps(policy, seqs, device, batches, tokenizer.pad_token_id, desc="rescoring", bf16=bf16)[0]

    # ---- rescoring (margin stage)
    times = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):
        for prec in times:
            times[prec].append(timed(lambda prec=prec: rescore(prec == "bf16")))
    sums = {prec: rescore(prec == "bf16") for prec in times}
    results["rescoring"] = {prec: {"tok_s": rescoring_tokens / min(t), "flops": 2 * n_params * rescoring_tokens / min(t)}
                            for prec, t in times.items()}
    per_token = abs(sums["bf16"] - sums["fp32"]) / [len(b) for _, b in seqs]
    print(f"rescoring: bf16 − fp32 log-prob sums differ by {per_token.mean():.4f} nats per token on average "
          f"(max {per_token.max():.4f})")

    # ---- reward scoring (score stage, hf_classifier)
    config = policy.config
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    torch.manual_seed(0)
    frame = pd.DataFrame({"prompt_id": [str(i) for i in range(args.pairs)], "prompt": prompts, "response": chosen})
    reward_tokens = sum(len(reward_input_ids(tokenizer, p, r, 1024)) for p, r in zip(prompts, chosen, strict=True))
    with tempfile.TemporaryDirectory() as rm_dir:
        AutoModelForSequenceClassification.from_config(config).save_pretrained(rm_dir)
        tokenizer.save_pretrained(rm_dir)
        scorers = {prec: ClassifierScorer(rm_dir, "float32", 16, 1024, device, False, 16384, bf16=prec == "bf16")
                   for prec in ("fp32", "bf16")}
        times = {"fp32": [], "bf16": []}
        for _ in range(args.repeats):
            for prec in times:
                times[prec].append(timed(lambda prec=prec: scorers[prec](frame, desc="reward")))
        rewards = {prec: scorers[prec](frame, desc="reward").to_numpy() for prec in times}
    results["reward scoring"] = {prec: {"tok_s": reward_tokens / min(t), "flops": 2 * n_params * reward_tokens / min(t)}
                                 for prec, t in times.items()}
    spread = rewards["fp32"].std() or 1.0
    print(f"reward: bf16 − fp32 differ by {abs(rewards['bf16'] - rewards['fp32']).max():.4f} at most "
          f"(rewards' std {spread:.4f})")

    # ---- train step (train stage; reference log-probs from the margin stage's code under the same precision)
    step_s, step_tokens, first_loss = {}, {}, {}
    per_step = 4
    tokens_per_step = rescoring_tokens / (args.pairs / per_step)
    for prec in ("fp32", "bf16"):
        ref = sums[prec]
        selected = pd.DataFrame({"prompt": [prompt_messages(p) for p in prompts],
                                 "chosen": [response_messages(c) for c in chosen],
                                 "rejected": [response_messages(r) for r in rejected],
                                 "logp_chosen_sum": ref[: args.pairs], "logp_rejected_sum": ref[args.pairs:]})
        cfg = compose_cfg(prec, args.device, [f"trainer.batch_size={per_step}", "trainer.save_steps=0",
                                              "trainer.max_length=512"])
        model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32, use_safetensors=True).to(device)
        clock = StepClock()
        with tempfile.TemporaryDirectory() as out:
            trainer = build_trainer(cfg, model, tokenizer, selected, out)
            trainer.add_callback(clock)
            started = time.perf_counter()
            trainer.train()
        steps = [b - a for a, b in zip([started, *clock.step_ends[:-1]], clock.step_ends, strict=True)]
        step_s[prec] = statistics.median(steps[1:])
        step_tokens[prec] = tokens_per_step
        first_loss[prec] = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    results["train step"] = {prec: {"tok_s": step_tokens[prec] / step_s[prec], "s_per_step": step_s[prec],
                                    "flops": 6 * n_params * step_tokens[prec] / step_s[prec]} for prec in step_s}
    print(f"train: first loss fp32 {first_loss['fp32']:.6f}, bf16 {first_loss['bf16']:.6f} (ln 2 = 0.693147)")

    # ---- generation (hf sampler)
    gen_prompts = [row["prompt"] for row in build_prompts(args.prompts, seed=1)]
    spec = SamplingSpec(n=4, max_new_tokens=96, temperature=0.8, top_p=0.95, seed=0, batch_size=16)
    samplers = {prec: HFSampler(policy_dir, "bfloat16" if prec == "bf16" else "float32", device, bf16=prec == "bf16")
                for prec in ("fp32", "bf16")}
    gen = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):
        for prec, sampler in samplers.items():
            started = time.perf_counter()
            out = sampler(gen_prompts, spec, desc=f"generate {prec}")
            gen[prec].append((sum(c.n_tokens for c in out), time.perf_counter() - started))
    results["generation"] = {}
    for prec, runs in gen.items():
        tokens, seconds = min(runs, key=lambda r: r[1] / r[0])
        weight_bytes = n_params * (2 if prec == "bf16" else 4)  # autocast's weight cache holds bf16 copies
        rows = spec.n * min(spec.batch_size, len(gen_prompts))
        bound = rows * bandwidth * 1e9 / weight_bytes  # tokens/s if each step only had to read the weights once
        results["generation"][prec] = {"tok_s": tokens / seconds, "flops": 2 * n_params * tokens / seconds,
                                       "memory_bound_tok_s": bound}

    # ---- the table
    print()
    print("| stage | fp32 tok/s | bf16 tok/s | bf16/fp32 | fp32 MFU (fp32 peak) | bf16 MFU (bf16 peak) | "
          "bf16 vs fp32 peak |")
    print("|---|---|---|---|---|---|---|")
    for stage, r in results.items():
        f, b = r["fp32"], r["bf16"]
        print(f"| {stage} | {f['tok_s']:,.0f} | {b['tok_s']:,.0f} | {b['tok_s'] / f['tok_s']:.2f}x | "
              f"{f['flops'] / 1e9 / peak['fp32']:.1%} | {b['flops'] / 1e9 / peak['bf16']:.1%} | "
              f"{b['flops'] / 1e9 / peak['fp32']:.1%} |")
    t = results["train step"]
    print(f"\ntrain step: fp32 {t['fp32']['s_per_step']:.2f} s, bf16 {t['bf16']['s_per_step']:.2f} s per step of "
          f"{per_step} pairs ({tokens_per_step:.0f} tokens): {t['fp32']['s_per_step'] / t['bf16']['s_per_step']:.2f}x")
    for prec in ("fp32", "bf16"):
        g = results["generation"][prec]
        print(f"generation {prec}: {g['tok_s']:,.0f} tok/s = {g['tok_s'] / g['memory_bound_tok_s']:.1%} of the "
              f"memory-bandwidth bound ({g['memory_bound_tok_s']:,.0f} tok/s at {spec.n * spec.batch_size} rows)")
    if args.out:
        args.out.write_text(json.dumps({"peak_gflops": peak, "bandwidth_gbs": bandwidth, "params": n_params,
                                        "found": found, "results": results, "first_loss": first_loss}, indent=1))


if __name__ == "__main__":
    main()
