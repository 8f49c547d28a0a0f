"""Generation throughput: the pipeline's `generate` stage (sampler=vllm, Ray actor) vs a bare `vllm.LLM.generate`.

Both generate the same prompts with the same per-request seeds, the same engine arguments and the same engine
environment (selfplay.backends.vllm_engine.engine_env), so they produce the same tokens (checked) and differ only in the
path around the engine: Ray actor, placement group, chunked dispatch, decoding and writing parquet. Each side runs
in its own fresh process, one after the other:

    bare      LLM(...) then one llm.generate(all requests)                 (vLLM's own continuous batching)
    pipeline  selfplay stage generate round=0 sampler=vllm ...             (a real run directory)

Printed: generated tokens/s of each, over the generate call alone and end to end (engine start included), and the
ratios pipeline / bare.

    .venv/bin/python bench/bench_vllm_generate.py [--prompts 128] [--n 4] [--max-new-tokens 96] [--model PATH]
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


def bare(args: argparse.Namespace) -> None:
    """Worker: a bare vLLM engine over the run's prompts; prints one JSON line."""
    import pandas as pd

    from selfplay.backends.samplers.vllm import eos_token_ids, request_seed
    from selfplay.backends.vllm_engine import EngineSpec, engine_cores, engine_env
    from selfplay.config import round_seed

    spec = EngineSpec(model=args.model, dtype="float32", max_model_len=2048, cpu_kv_cache_gb=args.kv_gb)
    os.environ.update(engine_env(spec, engine_cores(0, 1, None)))
    started = time.time()
    from vllm import LLM, SamplingParams

    from selfplay.backends.chat import generation_prompt_ids

    llm = LLM(**spec.llm_kwargs())
    start_s = time.time() - started
    prompts = pd.read_parquet(Path(args.run_dir) / "round_00" / "prompts.parquet")
    tokenizer = llm.get_tokenizer()
    eos = eos_token_ids(Path(args.model), tokenizer)
    seed = round_seed(0, 0)
    requests, params = [], []
    for pid, text in zip(prompts["prompt_id"], prompts["prompt"], strict=True):
        ids = generation_prompt_ids(tokenizer, text)
        for k in range(args.n):
            requests.append({"prompt_token_ids": ids})
            params.append(SamplingParams(n=1, seed=request_seed(seed, str(pid), k), max_tokens=args.max_new_tokens,
                                         temperature=0.8, top_p=0.95, stop_token_ids=eos, detokenize=False))
    t = time.time()
    outs = llm.generate(requests, params, use_tqdm=False)
    gen_s = time.time() - t
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    print(json.dumps({"start_s": start_s, "generation_s": gen_s, "tokens": sum(lengths), "lengths": lengths}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--kv-gb", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="sampler.batch_size (prompts per chunk); default: "
                    "conf/sampler/vllm.yaml's")
    ap.add_argument("--model", default=None, help="local model directory (default: the embedded SmolLM2-135M)")
    ap.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_worker:
        return bare(args)

    from selfplay.backends.default_model import ensure_default_policy

    args.model = args.model or str(ensure_default_policy())
    out = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    overrides = [f"output_root={out}", "run_name=bench", f"model.path={args.model}", "model.dtype=float32",
                 "device=cpu", "seed=0", "sampler=vllm", f"sampler.n={args.n}", f"sampler.cpu_kv_cache_gb={args.kv_gb}",
                 f"sampler.max_new_tokens={args.max_new_tokens}", f"prompts.per_round={args.prompts}"]
    if args.batch_size:
        overrides.append(f"sampler.batch_size={args.batch_size}")
    cli = [sys.executable, "-m", "selfplay.cli"]
    subprocess.run([*cli, "stage", "prompts", "round=0", *overrides], check=True, cwd=ROOT, capture_output=True)

    t = time.time()
    proc = subprocess.run([*cli, "stage", "generate", "round=0", *overrides], cwd=ROOT, capture_output=True, text=True)
    pipeline_wall = time.time() - t
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    manifest = json.loads((out / "bench" / "round_00" / "generate.done.json").read_text())
    stats = manifest["stats"]

    t = time.time()
    proc = subprocess.run([sys.executable, __file__, "--bare-worker", f"--run-dir={out / 'bench'}",
                           f"--model={args.model}", f"--n={args.n}", f"--max-new-tokens={args.max_new_tokens}",
                           f"--kv-gb={args.kv_gb}"], cwd=ROOT, capture_output=True, text=True)
    bare_wall = time.time() - t
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    b = json.loads(proc.stdout.strip().splitlines()[-1])

    import pandas as pd

    frame = pd.read_parquet(out / "bench" / "round_00" / "generations" / "part-00000.parquet")
    same = sorted(frame["n_tokens"].tolist()) == sorted(b["lengths"]) and int(frame["n_tokens"].sum()) == b["tokens"]
    tokens = stats["tokens"]
    rows = [
        ("generate call", tokens / b["generation_s"], tokens / stats["generation_s"]),
        ("whole process (imports, engine start, output)", tokens / bare_wall, tokens / pipeline_wall),
    ]
    print(f"# vLLM generation: pipeline vs bare — {args.prompts} prompts × n={args.n} × ≤{args.max_new_tokens} "
          f"tokens, {os.cpu_count()} CPUs, model {args.model}")
    print(f"generated tokens: pipeline {tokens}, bare {b['tokens']} (same lengths per request: {same})")
    print(f"engine start: pipeline {stats['engine_start_s']:.1f}s (Ray + actor + engine), bare {b['start_s']:.1f}s; "
          f"process wall: pipeline {pipeline_wall:.1f}s, bare {bare_wall:.1f}s")
    print("| measured over | bare tok/s | pipeline tok/s | pipeline / bare |")
    print("|---|---|---|---|")
    for name, bare_rate, pipe_rate in rows:
        print(f"| {name} | {bare_rate:.1f} | {pipe_rate:.1f} | {pipe_rate / bare_rate:.3f} |")


if __name__ == "__main__":
    main()
