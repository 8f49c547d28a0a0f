"""DPO training with the margin stage's reference log-probs reused (selfplay's default) against TRL's default, which
runs a reference model forward in every step — side by side in one process, through the train stage's own
`build_trainer`.

    .venv/bin/python bench/bench_train_reuse.py [--shape smollm2-135m|qwen2.5-0.5b] [--pairs 48] [--batch-size 4]
                                                [--device cpu|cuda]

Both trainers start from the same random-initialised weights (a real architecture's config, bench_scoring.py), see
the same pairs in the same order, and run the same steps. Printed: seconds per optimizer step (median after the
first step), the speed-up, and the loss of every step side by side: the first-step loss must agree within 1e-4
(issue 9), since the reused log-probs are the numbers TRL's reference pass computes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch
from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """Wall time at the end of each optimizer step."""

    def __init__(self):
        self.step_ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    import pandas as pd
    from bench_scoring import model_config, random_texts
    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM

    from selfplay.backends.batching import token_budget_batches
    from selfplay.backends.chat import prompt_messages, response_messages, training_tokens
    from selfplay.backends.default_model import ensure_default_policy
    from selfplay.backends.logprobs import completion_logps
    from selfplay.backends.modeling import load_tokenizer
    from selfplay.config import conf_dir, register
    from selfplay.stages.train import build_trainer

    rng = random.Random(0)
    tokenizer = load_tokenizer(ensure_default_policy())
    prompts = random_texts(tokenizer, args.pairs, 16, 128, rng)
    chosen = random_texts(tokenizer, args.pairs, 16, 192, rng)
    rejected = random_texts(tokenizer, args.pairs, 16, 192, rng)
    config = model_config(args.shape)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    # π_r as the train stage sees it: a model directory (TRL's default builds its reference model from that path).
    init_dir = tempfile.mkdtemp(prefix="bench-policy-")
    AutoModelForCausalLM.from_config(config).save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    device = torch.device(args.device)

    def fresh_model():
        return AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32).to(device)

    # The margin stage's reference sums: π_r's teacher-forced log-probs over the tokens the trainer sees.
    max_length = 512
    sequences = [training_tokens(tokenizer, p, c, "dpo", max_length) for p, c in zip(prompts, chosen, strict=True)]
    sequences += [training_tokens(tokenizer, p, r, "dpo", max_length) for p, r in zip(prompts, rejected, strict=True)]
    sums, _ = completion_logps(fresh_model().eval(), sequences, device,
                               token_budget_batches([len(a) + len(b) for a, b in sequences], 16), tokenizer.pad_token_id,
                               desc="margin-stage log-probs")
    selected = pd.DataFrame({"prompt": [prompt_messages(p) for p in prompts],
                             "chosen": [response_messages(c) for c in chosen],
                             "rejected": [response_messages(r) for r in rejected],
                             "logp_chosen_sum": sums[: args.pairs], "logp_rejected_sum": sums[args.pairs:]})

    register()
    results = {}
    for reuse in (True, False):
        overrides = [f"trainer.reuse_reference_logps={str(reuse).lower()}", f"trainer.batch_size={args.batch_size}",
                     f"trainer.max_length={max_length}", "trainer.learning_rate=1e-5", "trainer.save_steps=0",
                     f"device={args.device}", "model.dtype=float32"]
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        clock = StepClock()

        with tempfile.TemporaryDirectory() as out:
            trainer = build_trainer(cfg, fresh_model(), tokenizer, selected, out)
            trainer.add_callback(clock)
            started = time.perf_counter()
            trainer.train()
        ends = clock.step_ends
        steps = [b - a for a, b in zip([started, *ends[:-1]], ends, strict=True)]
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        results["reused reference log-probs" if reuse else "TRL default (reference model)"] = (steps, losses)

    (ours_steps, ours_losses), (trl_steps, trl_losses) = results.values()
    ours_s, trl_s = statistics.median(ours_steps[1:]), statistics.median(trl_steps[1:])
    print(f"{args.shape} (random init), {args.pairs} pairs, batch {args.batch_size}, {len(ours_steps)} steps, "
          f"{args.device}, threads {torch.get_num_threads()}")
    print(f"seconds per step (median of steps 2..): reused {ours_s:.3f}, TRL default {trl_s:.3f}; "
          f"speed-up {trl_s / ours_s:.3f}x")
    diffs = [abs(a - b) for a, b in zip(ours_losses, trl_losses, strict=True)]
    print("loss per step (reused | TRL default): "
          + ", ".join(f"{a:.6f}|{b:.6f}" for a, b in zip(ours_losses, trl_losses, strict=True)))
    print(f"first-step loss difference {diffs[0]:.2e}; largest over all steps {max(diffs):.2e}")


if __name__ == "__main__":
    main()
