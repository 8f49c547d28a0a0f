"""eval — held-out mean reward of π_{r+1} (same judge), and its win rate against π_0 on the same prompts.

Input:   round_XX/policy (π_{r+1}); held-out prompts (builtin: a fixed disjoint set; files: prompts.eval_source
         or the last prompts.eval_count rows); round_00/eval_base_generations.parquet for r > 0
Output:  round_XX/eval.json                    mean_reward, base_mean_reward, win_rate_vs_base, reward_gain_vs_base
                                               with its paired s.e., 95% interval and sign-flip test p-value; the
                                               capability guard: mean_reward/gain_{trained,unseen}_families (with
                                               prompts.eval_only_families) and drift_logp_per_token (eval.drift), …
         round_XX/eval_generations.parquet     prompt_id, prompt, sample_idx, response, reward (π_{r+1})
         round_00/eval_base_generations.parquet  the same for π_0 (round 0 only)
Win rate counts, per prompt, mean reward of π_{r+1} above π_0's as a win and equal as half a win.
Alone:   selfplay stage eval round=R
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from selfplay.backends.logprob_scorer import LogpScorer
from selfplay.backends.prompt_sources import heldout_prompts
from selfplay.backends.samplers import SamplingSpec, build_sampler, completions_frame, sampling_code_version
from selfplay.config import round_seed
from selfplay.core.stats import paired_gain, prompt_differences, win_rate
from selfplay.rewards.ifeval import family
from selfplay.rewards.scoring import build_scorer
from selfplay.rundir import atomic
from selfplay.rundir.layout import round_name
from selfplay.rundir.manifest import fingerprint
from selfplay.stages.base import config_view, policy_fingerprint

CONFIG = ("eval", "reward", "prompts", "sampler.backend", "sampler.max_new_tokens", "sampler.temperature", "sampler.top_p",
          "model.dtype", "model.trust_remote_code", "seed", "precision")


def OUTPUTS(r: int) -> tuple[str, ...]:  # noqa: N802 — the runner reads OUTPUTS from every stage
    base = ("eval_base_generations.parquet",) if r == 0 else ()
    return ("eval.json", "eval_generations.parquet", *base)


def requires(r: int, cfg=None) -> list[tuple[int, str]]:
    return [(r, "train")] + ([(0, "eval")] if r > 0 else [])


def generate_and_score(ctx, policy_path, prompts: pd.DataFrame, scorer, label: str,
                       cache: Path | None = None) -> pd.DataFrame:
    """The policy's held-out responses, scored. With `cache`, the responses are taken from (or saved to) that file;
    the rewards are always computed again, so a changed reward function never reads stale scores."""
    if cache is not None and cache.is_file():
        frame = pd.read_parquet(cache)
        ctx.stats["base_generations_from_cache"] = True
    else:
        frame = _generate(ctx, policy_path, prompts, label)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_parquet(cache, frame)
    frame["reward"] = scorer(frame, desc=f"{label} score").to_numpy()
    return frame


def base_cache(ctx, prompts: pd.DataFrame) -> Path:
    """Where π_0's held-out responses are kept for every run under output_root with the same base model, held-out
    prompts and decoding: they depend on nothing a run's selection or training changes (a sweep or experiment=compare
    generates them once). Keyed by the base model's files, the eval config view, the device and the sampling code
    with the libraries under it (sampling_code_version); `rm -r <output_root>/.cache` clears it."""
    cfg = ctx.cfg
    keys = tuple(k for k in CONFIG if k != "reward" and not (k == "seed" and cfg.eval.greedy))
    key = fingerprint({"policy": policy_fingerprint(cfg), "config": config_view(cfg, keys),
                       "prompts": prompts[["prompt_id", "prompt"]].astype(str).values.tolist(),
                       "device": str(ctx.device), "sampling_code": sampling_code_version()})
    return Path(cfg.output_root) / ".cache" / "eval_base" / f"{key}.parquet"


def _generate(ctx, policy_path, prompts: pd.DataFrame, label: str) -> pd.DataFrame:
    cfg = ctx.cfg
    sampler = build_sampler(cfg, policy_path, ctx.device)
    spec = SamplingSpec(n=cfg.eval.samples, max_new_tokens=cfg.sampler.max_new_tokens,
                        temperature=cfg.sampler.temperature, top_p=cfg.sampler.top_p, greedy=cfg.eval.greedy,
                        # the same held-out sampling seed every round
                        seed=round_seed(cfg.seed, 999),
                        # vllm: the engine batches by itself; small chunks would only add drains
                        batch_size=cfg.sampler.batch_size if cfg.sampler.backend == "vllm" else cfg.eval.batch_size)
    completions = sampler(list(prompts["prompt"]), spec, desc=label, keys=[str(k) for k in prompts["prompt_id"]])
    # what served the sampling (started, weights loaded in place, or kept), with the weights probe's figures
    ctx.stats.setdefault("engines", []).extend({"policy": label, **s} for s in getattr(sampler, "served", []))
    return completions_frame(prompts, completions)


def family_split(prompts: pd.DataFrame, policy: pd.DataFrame, base: pd.DataFrame, eval_only: list[str]) -> dict:
    """The capability guard's first two figures: held-out reward (and gain over π_0) on the prompts whose checkers are
    all of families trained on, and on those that use a family only the eval sees (prompts.eval_only_families)."""
    if not eval_only or "constraints" not in prompts:
        return {}
    unseen = prompts.set_index("prompt_id")["constraints"].map(
        lambda c: any(family(item["id"]) in eval_only for item in json.loads(c)))
    out = {}
    for name, ids in (("trained_families", unseen.index[~unseen]), ("unseen_families", unseen.index[unseen])):
        mine = policy[policy["prompt_id"].isin(ids)]
        theirs = base[base["prompt_id"].isin(ids)]
        out[f"heldout_prompts_{name}"] = int(len(ids))
        out[f"mean_reward_{name}"] = float(mine["reward"].mean()) if len(mine) else None
        out[f"gain_{name}"] = float(prompt_differences(mine, theirs).mean()) if len(mine) else None
    return out


def drift(ctx, base: pd.DataFrame) -> dict:
    """The guard's judge-free figure: mean per-token log-prob of π_0's greedy held-out responses under π_{r+1}, minus
    under π_0 itself (0 at π_0; falling as the policy moves away from what it used to say), with the tokens of the
    trainer's own format (selfplay/backends/chat.py)."""
    def per_token(policy_path, label: str) -> float:
        with LogpScorer(policy_path, ctx.cfg, ctx.device) as scorer:
            values = scorer(base[["prompt", "response"]], label)
        return float(values["logp_sum"].sum() / max(int(values["n_tokens"].sum()), 1))

    mine = per_token(ctx.round_dir / "policy", f"eval π_{ctx.round + 1} drift")
    if ctx.round == 0:
        base_value = per_token(ctx.policy_path(0), "eval π_0 drift")
    else:
        base_value = json.loads(ctx.path("eval.json", r=0).read_text()).get("base_responses_logp_per_token_pi0")
        if base_value is None:  # round 0 ran before this figure existed
            base_value = per_token(ctx.policy_path(0), "eval π_0 drift")
    return {"base_responses_logp_per_token": mine, "base_responses_logp_per_token_pi0": base_value,
            "drift_logp_per_token": mine - base_value}


def run(ctx) -> None:
    prompts = heldout_prompts(ctx.cfg)
    scorer = build_scorer(ctx.cfg, ctx.device)
    if ctx.round == 0:
        base = generate_and_score(ctx, ctx.policy_path(0), prompts, scorer, "eval π_0", cache=base_cache(ctx, prompts))
        base.to_parquet(ctx.out / "eval_base_generations.parquet", index=False)
    else:
        base = ctx.read_parquet("eval_base_generations.parquet", r=0)
    policy = generate_and_score(ctx, ctx.round_dir / "policy", prompts, scorer, f"eval π_{ctx.round + 1}")
    policy.to_parquet(ctx.out / "eval_generations.parquet", index=False)
    per_prompt = policy.groupby("prompt_id")["reward"].mean()
    result = {
        "round": ctx.round,
        "policy": f"{round_name(ctx.round)}/policy",
        "heldout_prompts": len(prompts),
        "samples_per_prompt": ctx.cfg.eval.samples,
        "mean_reward": float(policy["reward"].mean()),
        "stderr_reward": float(per_prompt.std(ddof=1) / np.sqrt(len(per_prompt))) if len(per_prompt) > 1 else 0.0,
        "base_mean_reward": float(base["reward"].mean()),
        "mean_response_tokens": float(policy["n_tokens"].mean()),
        **win_rate(policy, base),
    }
    # Same prompts for both policies: the per-prompt difference gives the gain's honest error bar and test.
    result.update(paired_gain(prompt_differences(policy, base).to_numpy(), seed=ctx.cfg.seed))
    result.update(family_split(prompts, policy, base, list(ctx.cfg.prompts.eval_only_families)))
    if ctx.cfg.eval.drift:
        result.update(drift(ctx, base))
    (ctx.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    ctx.stats.update({k: _short_float(v) if isinstance(v, float) else v for k, v in result.items() if k != "policy"})


def _short_float(value: float) -> float:
    """4 decimals, or 2 significant digits below 0.001: a p-value of 5e-05 must not read as 0 in the summary line."""
    return round(value, 4) if abs(value) >= 1e-3 or value == 0 else float(f"{value:.2g}")
