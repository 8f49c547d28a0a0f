"""generate — N candidate responses per prompt from the round's policy π_r.

Input:   round_XX/prompts.parquet; π_r (round 0: model.path, else round_{r-1}/policy)
Output:  round_XX/generations/part-00000.parquet
         prompt_id, prompt, sample_idx, response, n_tokens, finish_reason (+ the prompt file's other columns)
Alone:   selfplay stage generate round=R
"""

from __future__ import annotations

import pandas as pd

from ..chat import template_sha256
from ..config import round_seed
from ..samplers import SamplingSpec, build_sampler

OUTPUTS = ("generations",)
# Everything that decides the responses. Left out on purpose: how many engines share the work and how much memory
# each gets (sampler.num_engines, gpu_memory_utilization, cpu_kv_cache_gb, enforce_eager) — a run resumed on
# another allocation keeps its finished rounds.
CONFIG = ("model.dtype", "model.trust_remote_code", "seed", "sampler.backend", "sampler.n", "sampler.temperature",
          "sampler.top_p", "sampler.max_new_tokens", "sampler.batch_size", "sampler.tensor_parallel_size",
          "sampler.max_model_len", "sampler.max_num_batched_tokens", "sampler.overlong_prompts")


def requires(r: int) -> list[tuple[int, str]]:
    return [(r, "prompts")] + ([(r - 1, "train")] if r > 0 else [])


def completions_frame(prompts: pd.DataFrame, completions: list) -> pd.DataFrame:
    """One row per completion, with its prompt's columns first."""
    rows = pd.DataFrame(
        {
            "sample_idx": [c.sample_idx for c in completions],
            "response": [c.response for c in completions],
            "n_tokens": [c.n_tokens for c in completions],
            "finish_reason": [c.finish_reason for c in completions],
        }
    )
    prompt_rows = prompts.iloc[[c.prompt_index for c in completions]].reset_index(drop=True)
    first = ["prompt_id", "prompt"]
    extra = [c for c in prompt_rows.columns if c not in first]
    return pd.concat([prompt_rows[first], rows, prompt_rows[extra]], axis=1)


def run(ctx) -> None:
    cfg = ctx.cfg
    prompts = ctx.read_parquet("prompts.parquet")
    sampler = build_sampler(cfg, ctx.policy_path(), ctx.device)
    s = cfg.sampler
    spec = SamplingSpec(n=s.n, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                        seed=round_seed(cfg.seed, ctx.round), batch_size=s.batch_size)
    completions = sampler.generate(list(prompts["prompt"]), spec, desc=f"round {ctx.round} generate",
                                   keys=[str(k) for k in prompts["prompt_id"]])
    df = completions_frame(prompts, completions)
    (ctx.out / "generations").mkdir()
    df.to_parquet(ctx.out / "generations" / "part-00000.parquet", index=False)
    ctx.stats.update(
        prompts=len(prompts),
        responses=len(df),
        tokens=int(df["n_tokens"].sum()),
        mean_response_tokens=round(float(df["n_tokens"].mean()), 2),
        hit_length_limit=int((df["finish_reason"] == "length").sum()),
        skipped_overlong_prompts=getattr(sampler, "skipped_overlong", 0),
        **getattr(sampler, "timings", {}),
        chat_template_sha256=template_sha256(sampler.tokenizer),
    )
