"""Rescoring (the margin stage's log-probs) and reward scoring against a bare forward pass over the same tokens,
side by side in one process.

    .venv/bin/python bench/bench_scoring.py [--shape smollm2-135m|qwen2.5-0.5b] [--pairs 192] [--repeats 2]
                                            [--batch-size 64] [--max-batch-tokens 8192] [--device cpu|cuda]

Models are random-initialised from a real architecture's config (throughput does not depend on trained weights):
the embedded SmolLM2-135M's config, or Qwen2.5-0.5B's. Texts are random token strings, prompt 16–128 and response
16–192 tokens. For each measurement:

* ours — what the stage runs, from text: the chat template and tokenisation (`training_tokens` /
  `reward_input_ids`), token-budget batches (selfplay/backends/batching.py) and the forward (`completion_logps` through
  TRL's fused LM head; the reward model's score head);
* bare — `model(input_ids, attention_mask)` over exactly the same token ids in the same batches, tokenised before
  the clock starts, nothing else (the engine's own speed on this work);
* naive — what a script without length bucketing does: fixed batches of --batch-size in data order, full logits
  and log_softmax (rescoring) — for context.

tokens/s counts real (non-padding) tokens. The ratio ours/bare is what issue 9 asks to be ≥ 0.9.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

QWEN25_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936)


def model_config(shape: str):
    from transformers import AutoConfig

    from selfplay.backends.default_model import ensure_default_policy

    if shape == "smollm2-135m":
        return AutoConfig.from_pretrained(ensure_default_policy())
    if shape == "qwen2.5-0.5b":
        from transformers import Qwen2Config

        fields = dict(QWEN25_05B)
        fields.pop("model_type")
        return Qwen2Config(**fields)
    raise SystemExit(f"unknown --shape {shape}")


def random_texts(tokenizer, n: int, lo: int, hi: int, rng: random.Random) -> list[str]:
    vocab = [i for i in range(1000, min(tokenizer.vocab_size, 40000))]
    return [tokenizer.decode([rng.choice(vocab) for _ in range(rng.randint(lo, hi))]) for _ in range(n)]


def padded(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(batch), max(len(s) for s in batch)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from selfplay.backends.batching import token_budget_batches
    from selfplay.backends.chat import reward_input_ids, training_tokens
    from selfplay.backends.default_model import ensure_default_policy
    from selfplay.backends.logprobs import completion_logps
    from selfplay.backends.modeling import load_tokenizer

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rng = random.Random(0)
    tokenizer = load_tokenizer(ensure_default_policy())
    prompts = random_texts(tokenizer, args.pairs, 16, 128, rng)
    responses = random_texts(tokenizer, args.pairs, 16, 192, rng)
    config = model_config(args.shape)
    config.pad_token_id = tokenizer.pad_token_id
    policy = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    config.num_labels = 1
    reward_model = AutoModelForSequenceClassification.from_config(config, dtype=dtype).to(device).eval()
    pad = tokenizer.pad_token_id
    print(f"{args.shape} (random init, {sum(p.numel() for p in policy.parameters()) / 1e6:.0f}M), {args.pairs} "
          f"sequences, {args.device} {args.dtype}, threads {torch.get_num_threads()}, batch_size {args.batch_size}, "
          f"max_batch_tokens {args.max_batch_tokens}")

    # ---- rescoring: the margin stage's forward
    def ours_rescoring():
        seqs = [training_tokens(tokenizer, p, r, "dpo", 4096) for p, r in zip(prompts, responses, strict=True)]
        batches = token_budget_batches([len(a) + len(b) for a, b in seqs], args.batch_size, args.max_batch_tokens)
        completion_logps(policy, seqs, device, batches, pad, desc="ours")

    seqs = [training_tokens(tokenizer, p, r, "dpo", 4096) for p, r in zip(prompts, responses, strict=True)]
    full = [a + b for a, b in seqs]
    batches = token_budget_batches([len(s) for s in full], args.batch_size, args.max_batch_tokens)
    rescoring_tokens = sum(len(s) for s in full)

    def bare_rescoring():
        with torch.inference_mode():
            for batch in batches:
                ids, mask = padded([full[i] for i in batch], pad, device)
                policy(input_ids=ids, attention_mask=mask, use_cache=False)

    def naive_rescoring():
        with torch.inference_mode():
            for s in range(0, len(full), args.batch_size):
                rows = list(range(s, min(s + args.batch_size, len(full))))
                ids, mask = padded([full[i] for i in rows], pad, device)
                logits = policy(input_ids=ids, attention_mask=mask, use_cache=False).logits
                logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
                (logps * mask[:, 1:]).sum(-1)

    # ---- reward scoring: the score stage's forward
    encoded = [reward_input_ids(tokenizer, p, r, 4096) for p, r in zip(prompts, responses, strict=True)]
    rm_batches = token_budget_batches([len(e) for e in encoded], args.batch_size, args.max_batch_tokens * 2)
    reward_tokens = sum(len(e) for e in encoded)
    with tempfile.TemporaryDirectory() as tmp:
        rm_dir = Path(tmp)
        reward_model.save_pretrained(rm_dir)
        tokenizer.save_pretrained(rm_dir)
        from selfplay.rewards.scoring import ClassifierScorer

        scorer = ClassifierScorer(str(rm_dir), args.dtype, args.batch_size, 4096, device, False,
                                   args.max_batch_tokens * 2)
        import pandas as pd

        frame = pd.DataFrame({"prompt_id": [str(i) for i in range(args.pairs)], "prompt": prompts,
                              "response": responses})

        def ours_reward():
            scorer(frame, desc="ours")

        def bare_reward():
            with torch.inference_mode():
                for batch in rm_batches:
                    ids, mask = padded([encoded[i] for i in batch], pad, device)
                    scorer_model(input_ids=ids, attention_mask=mask)

        scorer_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=dtype).to(device).eval()
        runs = {"rescoring": {"ours": ours_rescoring, "bare": bare_rescoring, "naive": naive_rescoring},
                "reward scoring": {"ours": ours_reward, "bare": bare_reward}}
        tokens = {"rescoring": rescoring_tokens, "reward scoring": reward_tokens}
        for name, fns in runs.items():
            times = {k: [] for k in fns}
            for _ in range(args.repeats):  # interleaved, so drift hits all alike; the best of the repeats counts
                for k, fn in fns.items():
                    times[k].append(timed(fn))
            rate = {k: tokens[name] / min(v) for k, v in times.items()}
            line = ", ".join(f"{k} {rate[k]:,.0f} tok/s" for k in fns)
            print(f"{name}: {tokens[name]:,} tokens; {line}; ours/bare {rate['ours'] / rate['bare']:.3f}"
                  + (f"; ours/naive {rate['ours'] / rate['naive']:.3f}" if "naive" in rate else ""))


if __name__ == "__main__":
    main()
