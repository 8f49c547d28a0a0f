"""Peak memory of the data stages against the prompt count: one round of prompts → generate → score → pair →
margin → select, run by the real `selfplay stage` command in a fresh process per size, with a tiny random policy
(2 layers, hidden 64, SmolLM2's tokenizer) and a small fast reward function, so the data — not the model — is what
could grow.

    .venv/bin/python bench/bench_data_rss.py [--sizes 10000 100000] [--n 2] [--max-new-tokens 4]

Prints, per size, the process's peak RSS (getrusage, recorded in each stage's manifest), wall time and rows written, then the ratio of
the largest size's peak to the smallest's (issue 9 asks ≤ 1.5 for 100k vs 10k).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import pandas as pd
    from transformers import AutoTokenizer

    from selfplay.backends.default_model import gguf_path
    from selfplay.testing import make_policy

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-rss-"))
    gguf = gguf_path()
    policy = work / "policy"
    if not policy.exists():
        make_policy(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), policy)
    results = []
    for size in args.sizes:
        prompts = work / f"prompts-{size}.parquet"
        pd.DataFrame({"prompt": [f"Write item {i} of the list in {3 + i % 17} words." for i in range(size + 10)]}
                     ).to_parquet(prompts)
        overrides = [f"output_root={work}", f"run_name=rss-{size}", f"model.path={policy}", "model.dtype=float32",
                     "device=cpu", f"prompts.source={prompts}", f"prompts.per_round={size}", "prompts.eval_count=10",
                     f"sampler.n={args.n}", f"sampler.max_new_tokens={args.max_new_tokens}", "sampler.batch_size=256",
                     "sampler.top_p=1.0",  # a random model's flat distributions would make top-p sorting the cost
                     "reward=function", "reward.function=rewards_for_bench:response_length", "margin.batch_size=256",
                     "selection.ratio=0.5", "trainer.max_length=128"]
        started = time.time()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "bench")}
        proc = subprocess.run([sys.executable, "-m", "selfplay.cli", "stage", "prompts,generate,score,pair,margin,select",
                               "round=0", *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        rdir = work / f"rss-{size}" / "round_00"
        stages = {s: json.loads((rdir / f"{s}.done.json").read_text()) for s in
                  ("prompts", "generate", "score", "pair", "margin", "select")}
        per_stage = {s: m["timings"]["peak_rss_mb"] for s, m in stages.items()}
        peak_mb = max(per_stage.values())  # each manifest records the process's peak so far (getrusage)
        results.append((size, peak_mb, time.time() - started, stages["generate"]["stats"]["responses"],
                        stages["select"]["stats"]["selected"], per_stage))
    for size, peak, seconds, responses, selected, per_stage in results:
        print(f"{size:>7} prompts: peak RSS {peak:,.0f} MB, {seconds:.0f} s, {responses:,} responses, {selected:,} "
              f"selected; process peak after each stage (MB): {per_stage}")
    if len(results) > 1:
        print(f"peak RSS {results[-1][0]:,} vs {results[0][0]:,} prompts: {results[-1][1] / results[0][1]:.3f}x")


if __name__ == "__main__":
    main()
