"""score — a scalar reward for every response.

Input:   round_XX/generations/part-*.parquet
Output:  round_XX/scores/part-00000.parquet   generations' columns + reward
Backends (reward.backend): `function` — a TRL-style reward function `module:function`
         (f(prompts, completions, **columns) -> list[float]); `hf_classifier` — a local
         AutoModelForSequenceClassification reward model run with its own chat template.
Alone:   selfplay stage score round=R
"""

from __future__ import annotations

from ..rewards.scoring import build_scorer

OUTPUTS = ("scores",)
CONFIG = ("reward", "model.trust_remote_code")


def requires(r: int) -> list[tuple[int, str]]:
    return [(r, "generate")]


def run(ctx) -> None:
    df = ctx.read_parquet("generations")
    scorer = build_scorer(ctx.cfg, ctx.device)
    df["reward"] = scorer(df, desc=f"round {ctx.round} score")
    (ctx.out / "scores").mkdir()
    df.to_parquet(ctx.out / "scores" / "part-00000.parquet", index=False)
    ctx.stats.update(responses=len(df), mean_reward=round(float(df["reward"].mean()), 4),
                     std_reward=round(float(df["reward"].std(ddof=0)), 4))
