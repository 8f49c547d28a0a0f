"""GPU correctness check of the whole loop: 2 rounds through the real `selfplay` command with device=cuda, on random
models built from a real tokenizer (its chat template included), with an hf_classifier reward model, in fp32 and
with precision=bf16. Prints each stage's seconds and checks the outputs.

    python bench/gpu_e2e.py --tokenizer DIR [--out /tmp/gpu_e2e] [--hidden 512] [--layers 8]
DIR: any tokenizer directory with a chat template (e.g. the converted embedded default's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", default="/tmp/gpu_e2e")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from selfplay.testing import make_policy, make_reward_model

    assert torch.cuda.is_available(), "this check needs a CUDA device"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    policy = make_policy(tok, out / "policy0", hidden=args.hidden, layers=args.layers)
    rm = make_reward_model(tok, out / "rm", hidden=args.hidden // 2, layers=2)
    prompts = out / "prompts.jsonl"
    topics = ["rain", "a lost cat", "the sea", "a train trip", "coffee", "winter", "a city at night", "robots"]
    pd.DataFrame({"prompt": [f"Write two sentences about {t}, variant {i}." for i in range(40) for t in topics]}
                 ).to_json(prompts, orient="records", lines=True)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    for name, extra in (("fp32", []), ("bf16", ["precision=bf16"])):
        cmd = [sys.executable, "-m", "selfplay.cli", "run", f"output_root={out}", f"run_name={name}", "device=cuda",
               f"model.path={policy}", "model.dtype=float32", "rounds=2", f"prompts.source={prompts}",
               "prompts.per_round=128", "prompts.eval_count=64", "sampler.n=4", "sampler.max_new_tokens=64",
               "sampler.batch_size=64", "reward=hf_classifier", f"reward.model={rm}", "reward.dtype=float32",
               "reward.batch_size=64", "margin.batch_size=32", "trainer.batch_size=8", "trainer.learning_rate=1e-4",
               "eval.batch_size=64", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-5000:])
            raise SystemExit(f"{name}: selfplay run failed")
        run_dir = out / name
        for r in range(2):
            rdir = run_dir / f"round_{r:02d}"
            secs = {s: json.loads((rdir / f"{s}.done.json").read_text())["timings"]["seconds"]
                    for s in ("generate", "score", "margin", "train", "eval")}
            sel = pd.read_parquet(rdir / "selected.parquet")
            gens = pd.read_parquet(rdir / "generations")
            ev = json.loads((rdir / "eval.json").read_text())
            train = json.loads((rdir / "train.done.json").read_text())["stats"]
            assert (gens.groupby("prompt_id").size() == 4).all() and len(sel) > 0
            print(f"{name} round {r}: {len(gens)} responses, {len(sel)} selected, first/final loss "
                  f"{train['first_loss']}/{train['final_loss']}, held-out {ev['mean_reward']:.3f} "
                  f"(pi_0 {ev['base_mean_reward']:.3f}); seconds " + " ".join(f"{k} {v:.1f}" for k, v in secs.items()))
    print("gpu_e2e: OK")


if __name__ == "__main__":
    main()
