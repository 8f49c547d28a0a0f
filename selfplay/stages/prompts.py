"""prompts — the prompts of one round.

Output:  round_XX/prompts.parquet   prompt_id, prompt (+ any other columns of the source; the reward function
                                     receives them as keyword lists, e.g. the built-in judge's `constraints`)
Source:  `prompts.source=builtin` draws fresh IFEval-style tasks each round (seeded by `seed` and the round);
         a file (.parquet/.jsonl/.json/.csv) is read in order, `prompts.per_round` rows a round, wrapping around
         (selfplay/backends/prompt_sources.py).
Evolve:  prompts.evolve=K: π_r rewrites K of them into harder variants that join the round (selfplay/core/evolve.py);
         the stage then reads π_r (round r−1's train) and records the sampler keys it used.
Alone:   selfplay stage prompts round=R
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from selfplay.backends.prompt_sources import train_prompts
from selfplay.backends.samplers import SamplingSpec, build_sampler
from selfplay.config import round_seed
from selfplay.core.evolve import clean_rewrite, keep_rewrites, split_rewritable

log = logging.getLogger("selfplay")

OUTPUTS = ("prompts.parquet",)


def CONFIG(cfg) -> tuple[str, ...]:  # noqa: N802 — the runner reads CONFIG from every stage
    evolve = ("model.dtype", "model.trust_remote_code", "sampler.backend", "sampler.temperature", "sampler.top_p",
              "precision")
    return ("prompts", "seed") + (evolve if cfg.prompts.evolve else ())


def requires(r: int, cfg=None) -> list[tuple[int, str]]:
    return [(r - 1, "train")] if cfg is not None and cfg.prompts.evolve and r > 0 else []


def run(ctx) -> None:
    df = train_prompts(ctx.cfg, ctx.round)
    ctx.stats.update(rows=len(df), **df.attrs)  # files: skipped_empty, skipped_overlong (whole file)
    df.attrs.clear()
    if ctx.cfg.prompts.evolve:
        evolved, counts = evolve_prompts(df, ctx.cfg, ctx.policy_path(), ctx.device, round_seed(ctx.cfg.seed, ctx.round),
                                         label=f"round {ctx.round} evolve")
        df = pd.concat([df.assign(evolved_from=None), evolved], ignore_index=True)
        ctx.stats.update(rows=len(df), base_rows=len(df) - len(evolved), **counts)
    df.to_parquet(ctx.out / "prompts.parquet", index=False)


def evolve_prompts(prompts: pd.DataFrame, cfg: Any, policy_path: Any, device: Any, seed: int,
                   label: str = "evolve") -> tuple[pd.DataFrame, dict[str, int]]:
    """The evolved rows for `prompts` (a seeded choice of prompts.evolve of them) and the filter counts."""
    p, s = cfg.prompts, cfg.sampler
    builtin = p.source == "builtin"
    candidates = prompts
    if builtin and "constraints" in prompts:
        candidates = prompts[~prompts["constraints"].str.contains("repeat_prompt", regex=False)]
    rng = np.random.default_rng(seed)
    chosen = candidates.iloc[np.sort(rng.permutation(len(candidates))[: min(p.evolve, len(candidates))])]
    chosen = chosen.reset_index(drop=True)
    parts = [split_rewritable(text, builtin) for text in chosen["prompt"]]
    requests = [p.evolve_instruction.replace("{prompt}", head) for head, _ in parts]
    counts = {"evolve_candidates": len(chosen)}
    if not requests:
        return prompts.iloc[:0].assign(evolved_from=pd.Series(dtype=str)), counts
    spec = SamplingSpec(n=1, max_new_tokens=p.evolve_max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                        seed=seed, batch_size=s.batch_size)
    with build_sampler(cfg, policy_path, device) as sampler:
        completions = sampler(requests, spec, desc=label, keys=[str(k) for k in chosen["prompt_id"]])
    rewrites = [""] * len(chosen)
    for c in completions:
        text = clean_rewrite(c.response)
        rewrites[c.prompt_index] = " ".join(text.split()) if builtin else text  # a task is one line
    kept, reasons = keep_rewrites([head for head, _ in parts], [tail for _, tail in parts], rewrites,
                                  p.evolve_max_length_ratio, set(prompts["prompt"]))
    counts.update(reasons)
    rows = []
    for i in kept:
        row = chosen.iloc[i].to_dict()
        row.update(prompt_id=f"{row['prompt_id']}~evolved", prompt=rewrites[i] + parts[i][1],
                   evolved_from=str(row["prompt_id"]))
        rows.append(row)
    counts["evolved"] = len(rows)
    log.info("%s: %d of %d rewrites kept (empty %d, unchanged %d, length ratio %d, duplicate %d)", label, len(rows),
             len(chosen), counts["evolve_empty"], counts["evolve_unchanged"], counts["evolve_length_ratio"],
             counts["evolve_duplicate"])
    return pd.DataFrame(rows, columns=[*prompts.columns, "evolved_from"]), counts
