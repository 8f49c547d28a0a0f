"""score — a scalar reward for every response.

Input:   round_XX/generations/part-*.parquet
Output:  round_XX/scores/part-00000.parquet   generations' columns + reward
Backends (reward.backend): `function` — a TRL-style reward function `module:function`
         (f(prompts, completions, **columns) -> list[float]); `hf_classifier` — a local
         AutoModelForSequenceClassification reward model run with its own chat template.
Alone:   selfplay stage score round=R [shard=i num_shards=n]   (see selfplay/rundir/shards.py)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from selfplay.errors import SelfplayError
from selfplay.rewards.scoring import build_scorer

OUTPUTS = ("scores",)


def CONFIG(cfg) -> tuple[str, ...]:  # noqa: N802 — the runner reads CONFIG from every stage
    """A reward model runs under `precision`; a reward function does not."""
    return ("reward", "model.trust_remote_code") + (("precision",) if cfg.reward.backend != "function" else ())


def requires(r: int, cfg=None) -> list[tuple[int, str]]:
    return [(r, "generate")]


def compute(ctx, shard: int, num_shards: int) -> pd.DataFrame:
    """Rewards of this shard's batches of the backend's schedule, keyed by row of the generations."""
    df = ctx.read_parquet("generations")
    scorer = build_scorer(ctx.cfg, ctx.device)
    label = f"round {ctx.round} score" + (f" {shard}/{num_shards}" if num_shards > 1 else "")
    rewards = scorer(df, desc=label, shard=(shard, num_shards))
    rows = rewards.index.to_numpy()
    return pd.DataFrame({"row": rows, "prompt_id": df["prompt_id"].to_numpy()[rows],
                         "sample_idx": df["sample_idx"].to_numpy()[rows], "reward": rewards.to_numpy()})


def merge(ctx, parts: list[Path], part_stats: list[dict]) -> None:
    df = ctx.read_parquet("generations")
    rewards = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True).set_index("row").sort_index()
    # Every row scored exactly once, by the row it claims (a part from other generations would not line up).
    if not rewards.index.equals(pd.RangeIndex(len(df))) or not (
            (rewards["prompt_id"].to_numpy() == df["prompt_id"].to_numpy()).all()
            and (rewards["sample_idx"].to_numpy() == df["sample_idx"].to_numpy()).all()):
        raise SelfplayError(f"round {ctx.round} score: the shard parts do not cover the {len(df)} generations row for "
                            "row; delete shards/score in the round directory and score again")
    df["reward"] = rewards["reward"].to_numpy()
    (ctx.out / "scores").mkdir()
    df.to_parquet(ctx.out / "scores" / "part-00000.parquet", index=False)
    ctx.stats.update(responses=len(df), mean_reward=round(float(df["reward"].mean()), 4),
                     std_reward=round(float(df["reward"].std(ddof=0)), 4))
