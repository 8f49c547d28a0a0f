"""The speed levers of the default run, each measured against today's path on one frozen round, in one process.

    .venv/bin/python bench/bench_levers.py --run outputs/default [--round 0] [--steps 6] [--repeats 2]
                                           [--generate-prompts 64] [--skip-generate]

The frozen round is a finished run's round R: π_R (the base model for R = 0), its selected pairs and its prompts
(run `selfplay run` first; the README's first command writes outputs/default). Printed, and written to
bench/results/levers_<class>.md when --write is given:

- the processor: its class (amx | avx512bf16 | avx2), the flags that decide it, and the measured fp32 and bf16
  matmul peaks on the threads torch uses (bounded in time: bf16 is emulated, and very slow, on AVX2-only CPUs);
- **train step** arms, the train stage's own trainer (stages/train.build_trainer) on the round's selected pairs
  at the run's precision: `two rows` (TRL's layout: prompt + chosen and prompt + rejected, each padded to the
  batch's longest) and `shared prompt` (one row [prompt | chosen | rejected] a pair, the default). The arms take
  turns, `--steps` optimizer steps at a time, `--repeats` times; each arm's figure is the median over its
  steps, the first step of each turn left out (allocation and warm-up). MFU counts the work either layout must do
  — 6 · non-embedding parameters · (prompt + chosen + rejected tokens) plus the LM head at the completion
  tokens — against the measured peak of the precision in use;
- **generation** arms (unless --skip-generate): the generate stage's vLLM engine settings against variants, each
  arm a fresh engine in its own process on the round's prompts × sampler.n, the same per-request seeds; the arms
  take turns as well, and each reports decode tokens/s of the generate call (engine start apart).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Train arms: (one row per pair, attention implementation, a sampling engine kept idle beside the trainer as
# sampler.keep_engines does in a run).
TRAIN_ARMS: dict[str, tuple[bool, str, bool]] = {
    "two rows, sdpa": (False, "sdpa", False),
    "shared prompt, sdpa": (True, "sdpa", False),
    "shared prompt, eager attention": (True, "eager", False),
    "shared prompt, sdpa, idle engine alive": (True, "sdpa", True),
}

# Generation arms: what each changes against the generate stage's engine settings ("engine": vllm.LLM arguments)
# and its sampling ("sampling": SamplingParams fields; "seeded": False drops the per-request seeds). The last three
# are diagnoses, not levers: they change what is sampled, and show what the sampling itself costs.
GENERATION_ARMS: dict[str, dict] = {
    "today": {},
    "prefix caching": {"engine": {"enable_prefix_caching": True}},
    "no nucleus (top_p=1; diagnosis)": {"sampling": {"top_p": 1.0}},
    "no per-request seeds (diagnosis)": {"seeded": False},
    "greedy (diagnosis)": {"sampling": {"temperature": 0.0}},
}


def matmul_peak(dtype_name: str, budget_s: float = 4.0) -> tuple[float, int]:
    """Measured GFLOP/s of square matmuls in `dtype`: the size grows from 128 while one product takes < 50 ms (at
    most 1024), then products run for about `budget_s`. Returns (GFLOP/s, size)."""
    import torch

    dtype = getattr(torch, dtype_name)
    size = 128
    while True:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        started = time.perf_counter()
        a @ b
        one = time.perf_counter() - started
        if one > 0.05 or size >= 1024:
            break
        size *= 2
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget_s or count == 0:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - started) / 1e9, size


def processor_header() -> dict:
    import torch

    from selfplay.backends.precision import cpu_class, cpu_flags

    flags = cpu_flags()
    fp32, fp32_n = matmul_peak("float32")
    bf16, bf16_n = matmul_peak("bfloat16")
    return dict(cpu_class=cpu_class(flags), threads=torch.get_num_threads(),
                flags=sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
                fp32_gflops=round(fp32, 1), fp32_size=fp32_n, bf16_gflops=round(bf16, 1), bf16_size=bf16_n)


def _round_config(run: Path, r: int, steps: int):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    cfg.trainer.save_steps = 0
    cfg.round = r
    return cfg, steps


def _frozen_round(run: Path, r: int):
    import pandas as pd

    from selfplay.backends.modeling import resolve_model_path
    from selfplay.rundir.layout import round_dir

    cfg, _ = _round_config(run, r, 0)
    selected = pd.read_parquet(round_dir(run, r) / "selected.parquet")
    policy = resolve_model_path(cfg.model.path) if r == 0 else round_dir(run, r - 1) / "policy"
    return cfg, selected, policy


def _work_per_pair(tokenizer, selected, cfg) -> tuple[list[int], list[int]]:
    """(prompt + chosen + rejected tokens, chosen + rejected tokens) of each pair, as the trainer tokenizes them."""
    from selfplay.backends.chat import training_tokens

    total, completions = [], []
    for p, c, r in zip(selected["prompt"], selected["chosen"], selected["rejected"], strict=True):
        # the table holds one-message conversations; training_tokens takes their texts
        p, c, r = (messages[-1]["content"] for messages in (p, c, r))
        prompt, chosen = training_tokens(tokenizer, p, c, "dpo", cfg.trainer.max_length)
        rejected = training_tokens(tokenizer, p, r, "dpo", cfg.trainer.max_length)[1]
        total.append(len(prompt) + len(chosen) + len(rejected))
        completions.append(len(chosen) + len(rejected))
    return total, completions


def train_arms(run: Path, r: int, steps: int, repeats: int, peak: dict) -> list[dict]:
    from selfplay.backends.modeling import load_tokenizer

    cfg, selected, policy = _frozen_round(run, r)
    tokenizer = load_tokenizer(policy, False)
    seconds: dict[str, list[float]] = {name: [] for name in TRAIN_ARMS}
    losses: dict[str, list[float]] = {name: [] for name in TRAIN_ARMS}
    for _ in range(repeats):
        for name, (share, attention, idle_engine) in TRAIN_ARMS.items():
            with _idle_engine(cfg, policy) if idle_engine else contextlib.nullcontext():
                times, losses[name] = _train_turn(cfg, policy, tokenizer, selected, share, attention, steps)
            seconds[name] += times[1:]
            print(f"  train {name}: steps {', '.join(f'{t:.2f}' for t in times)} s", flush=True)
    return _train_rows(seconds, losses, cfg, selected, tokenizer, policy, peak)


def _idle_engine(cfg, policy):
    """The run's sampling engine for π_r, started and then left idle (what a kept engine does during train)."""
    from selfplay.backends.precision import engine_dtype
    from selfplay.backends.vllm_engine import EnginePool, engine_spec

    return EnginePool(engine_spec(policy, engine_dtype(cfg), "cpu", cfg.sampler, False))


def _train_turn(cfg, policy, tokenizer, selected, share, attention, steps) -> tuple[list[float], list[float]]:
    """`steps` optimizer steps of the train stage's trainer from π_r: (seconds of each step, losses)."""
    import torch
    from transformers import TrainerCallback

    from selfplay.backends.modeling import load_causal_lm
    from selfplay.stages.train import build_trainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    model = load_causal_lm(policy, cfg.model.dtype, torch.device("cpu"), False).train()
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(cfg, model, tokenizer, selected, out, share_prompt=share,
                                eager_attention=attention == "eager")
        trainer.args.max_steps = steps
        clock = StepClock()
        trainer.add_callback(clock)
        started = time.perf_counter()
        trainer.train()
    times = [b - a for a, b in zip([started, *clock.ends[:-1]], clock.ends, strict=True)]
    return times, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _train_rows(seconds, losses, cfg, selected, tokenizer, policy, peak) -> list[dict]:
    """Median step, speed-up against the first arm, and MFU: the work either layout must do (6 · non-embedding
    parameters · prompt + chosen + rejected tokens, plus the LM head at the completions) against the peak of the
    precision in use."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from selfplay.backends.precision import train_bf16

    config = AutoConfig.from_pretrained(policy)
    with torch.device("meta"):  # shapes only
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    embedding = config.vocab_size * config.hidden_size
    nonembedding = parameters - embedding * (1 if config.tie_word_embeddings else 2)
    total, completions = _work_per_pair(tokenizer, selected, cfg)
    pairs_per_step = min(cfg.trainer.batch_size, len(selected))
    flops = 6 * (nonembedding * statistics.mean(total) + embedding * statistics.mean(completions)) * pairs_per_step
    peak_gflops = peak["bf16_gflops" if train_bf16(cfg) else "fp32_gflops"]
    rows = []
    for name in TRAIN_ARMS:
        median = statistics.median(seconds[name])
        rows.append(dict(arm=name, median_step_s=round(median, 3), steps_timed=len(seconds[name]),
                         mfu=round(flops / median / 1e9 / peak_gflops, 3), first_loss=round(losses[name][0], 5)))
    for row in rows:
        row["speedup"] = round(rows[0]["median_step_s"] / row["median_step_s"], 3)
    return rows


def generation_worker(args: argparse.Namespace) -> None:
    """One generation arm in a fresh process: the generate stage's engine settings changed by the arm."""
    from selfplay.backends.vllm_engine import EngineSpec, engine_cores, engine_env

    cfg, _, policy = _frozen_round(Path(args.run), args.round)
    spec = EngineSpec(model=str(policy), dtype=args.dtype, max_model_len=cfg.sampler.max_model_len,
                      cpu_kv_cache_gb=cfg.sampler.cpu_kv_cache_gb, enforce_eager=cfg.sampler.enforce_eager)
    os.environ.update(engine_env(spec, engine_cores(0, 1, None)))
    import pandas as pd
    from vllm import LLM, SamplingParams

    from selfplay.backends.chat import generation_prompt_ids
    from selfplay.backends.samplers.vllm import eos_token_ids, request_seed
    from selfplay.config import round_seed
    from selfplay.rundir.layout import round_dir

    started = time.perf_counter()
    arm = GENERATION_ARMS[args.generation_arm]
    llm = LLM(**{**spec.llm_kwargs(), **arm.get("engine", {})})
    start_s = time.perf_counter() - started
    prompts = pd.read_parquet(round_dir(Path(args.run), args.round) / "prompts.parquet").head(args.generate_prompts)
    tokenizer = llm.get_tokenizer()
    eos = eos_token_ids(policy, tokenizer)
    seed = round_seed(cfg.seed, args.round)
    requests, params = [], []
    for pid, text in zip(prompts["prompt_id"], prompts["prompt"], strict=True):
        ids = generation_prompt_ids(tokenizer, text)
        for k in range(cfg.sampler.n):
            requests.append({"prompt_token_ids": ids})
            sampling = {"temperature": cfg.sampler.temperature, "top_p": cfg.sampler.top_p, **arm.get("sampling", {})}
            params.append(SamplingParams(n=1, seed=request_seed(seed, str(pid), k) if arm.get("seeded", True) else None,
                                         max_tokens=cfg.sampler.max_new_tokens, stop_token_ids=eos, detokenize=False,
                                         **sampling))
    started = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("ARM " + json.dumps(dict(arm=args.generation_arm, start_s=round(start_s, 1), generate_s=round(seconds, 2),
                                   tokens=tokens, requests=len(requests))), flush=True)


def generation_arms(args: argparse.Namespace, dtype: str) -> list[dict]:
    runs: dict[str, list[dict]] = {name: [] for name in GENERATION_ARMS}
    for _ in range(args.repeats):
        for name in GENERATION_ARMS:
            command = [sys.executable, __file__, "--run", args.run, "--round", str(args.round), "--generation-arm",
                       name, "--generate-prompts", str(args.generate_prompts), "--dtype", dtype]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in done.stdout.splitlines() if x.startswith("ARM ")), None)
            if line is None:
                sys.exit(f"generation arm {name!r} failed:\n{done.stderr[-3000:]}")
            runs[name].append(json.loads(line[4:]))
            print(f"  generate {name}: {runs[name][-1]}", flush=True)
    rows = []
    for name, results in runs.items():
        rates = [x["tokens"] / x["generate_s"] for x in results]
        rows.append(dict(arm=name, tokens_per_s=round(statistics.median(rates), 1),
                         tokens=results[0]["tokens"], start_s=round(statistics.median(x["start_s"] for x in results), 1)))
    for row in rows:
        row["speedup"] = round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(ROOT / "outputs" / "default"), help="a finished run directory")
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per turn of a train arm")
    parser.add_argument("--repeats", type=int, default=2, help="turns of each arm")
    parser.add_argument("--generate-prompts", type=int, default=64, help="prompts (× sampler.n) per generation arm")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--write", action="store_true", help="write bench/results/levers_<class>.md")
    parser.add_argument("--generation-arm", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generation_arm:
        return generation_worker(args)
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        sys.exit(f"--run {run}: no config.yaml there; run `selfplay run` first (outputs/default by default)")

    from selfplay.backends.precision import train_bf16

    peak = processor_header()
    print(f"processor {peak['cpu_class']} ({', '.join(peak['flags'])}), {peak['threads']} threads: matmul fp32 "
          f"{peak['fp32_gflops']} GFLOP/s (n={peak['fp32_size']}), bf16 {peak['bf16_gflops']} GFLOP/s "
          f"(n={peak['bf16_size']})", flush=True)
    cfg, _ = _round_config(run, args.round, 0)
    train = train_arms(run, args.round, args.steps, args.repeats, peak)
    generate = [] if args.skip_generate else generation_arms(args, "bfloat16" if train_bf16(cfg) else "float32")
    report = dict(processor=peak, run=str(run), round=args.round, precision=cfg.precision, train=train,
                  generate=generate, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(report, indent=1))
    if args.write:
        out = ROOT / "bench" / "results" / f"levers_{peak['cpu_class']}.md"
        out.write_text(markdown(report, " ".join(sys.argv[1:])))
        print(f"wrote {out}")


def markdown(report: dict, argv: str) -> str:
    """The report as bench/results/levers_<class>.md: the command, the processor, one table per lever."""
    p = report["processor"]
    lines = [f"# Speed levers on one frozen round — {p['cpu_class']}, {report['date']}", "",
             f"Command: `.venv/bin/python bench/bench_levers.py {argv}` (round {report['round']} of "
             f"`{report['run']}`, precision {report['precision']}).", "",
             f"Processor class **{p['cpu_class']}** (flags {', '.join(p['flags'])}), {p['threads']} threads; measured "
             f"matmul peaks: fp32 {p['fp32_gflops']} GFLOP/s, bf16 {p['bf16_gflops']} GFLOP/s "
             f"({p['bf16_gflops'] / p['fp32_gflops']:.2f}×).", "",
             "## Train step (median s per optimizer step, steps 2.. of each turn)", "",
             "| arm | s / step | speed-up | MFU | steps timed | first loss |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['median_step_s']} | **{r['speedup']}×** | {r['mfu']:.0%} | {r['steps_timed']} | "
              f"{r['first_loss']} |" for r in report["train"]]
    if report["generate"]:
        lines += ["", "## Generation (decode tokens/s of the generate call, median over turns)", "",
                  "| arm | tokens/s | speed-up | tokens | engine start s |", "|---|---|---|---|---|"]
        lines += [f"| {r['arm']} | {r['tokens_per_s']} | **{r['speedup']}×** | {r['tokens']} | {r['start_s']} |"
                  for r in report["generate"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
