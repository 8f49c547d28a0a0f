"""score — a scalar reward for every response.

Input:   round_XX/generations/part-*.parquet
Output:  round_XX/scores/part-*.parquet   generations' rows and columns + reward, one part per window of
         `window_rows` rows (selfplay/rundir/tables.py): the stage holds one window of text at a time
Backends (reward.backend): `function` — a TRL-style reward function `module:function`
         (f(prompts, completions, **columns) -> list[float]); `hf_classifier` — a local
         AutoModelForSequenceClassification reward model run with its own chat template.
Alone:   selfplay stage score round=R [shard=i num_shards=n]   (see selfplay/rundir/shards.py)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from selfplay.errors import SelfplayError
from selfplay.rewards.scoring import build_scorer
from selfplay.rundir import atomic, tables
from selfplay.rundir.shards import shard_span

OUTPUTS = ("scores",)
# A reward function's scores do not depend on the window it is called on (a model's do: CONFIG adds it).
UNKEYED = ("window_rows",)


def CONFIG(cfg) -> tuple[str, ...]:  # noqa: N802 — the runner reads CONFIG from every stage
    """A reward model runs under `precision`; a reward function does not."""
    # A model's batches form inside a window, so window_rows counts for a model too (a function sees ≤ 512 rows a call
    # whatever the window).
    model = ("precision", "window_rows") if cfg.reward.backend != "function" else ()
    return ("reward", "model.trust_remote_code") + model


def requires(r: int, cfg=None) -> list[tuple[int, str]]:
    return [(r, "generate")]


def compute(ctx, shard: int, num_shards: int) -> Iterator[pd.DataFrame]:
    """Rewards of this shard's windows of the generations (`window_rows` rows each, scored one at a time in the
    backend's batches), keyed by row of the generations; yielded window by window, as the part file takes them."""
    path = ctx.path("generations")
    spans = tables.windows(tables.count_rows(path), ctx.cfg.window_rows)
    lo, hi = shard_span(len(spans), 1, shard, num_shards)
    label = f"round {ctx.round} score" + (f" {shard}/{num_shards}" if num_shards > 1 else "")
    yield pd.DataFrame({"row": pd.Series(dtype="int64"), "prompt_id": pd.Series(dtype=object),
                        "sample_idx": pd.Series(dtype="int64"), "reward": pd.Series(dtype="float64")})
    with build_scorer(ctx.cfg, ctx.device) as scorer:
        for w, (start, _, frame) in enumerate(tables.iter_windows(path, spans[lo:hi]), start=lo):
            rewards = scorer(frame, desc=label + (f" window {w + 1}/{len(spans)}" if len(spans) > 1 else ""))
            rows = rewards.index.to_numpy()
            yield pd.DataFrame({"row": rows + start, "prompt_id": frame["prompt_id"].to_numpy()[rows],
                                "sample_idx": frame["sample_idx"].to_numpy()[rows], "reward": rewards.to_numpy()})


def merge(ctx, parts: list[Path], part_stats: list[dict]) -> None:
    """scores/ is generations' rows window by window, each with its reward (one part file per window)."""
    path = ctx.path("generations")
    n_rows = tables.count_rows(path)
    # Arrow, not pandas: the ids compare as arrow strings, without a Python string per row.
    rewards = tables.read_arrow(parts)
    rewards = rewards.take(pc.sort_indices(rewards["row"]))
    keys = tables.read_arrow(tables.table_files(path), ["prompt_id", "sample_idx"])
    # Every row scored exactly once, by the row it claims (a part from other generations would not line up).
    lined_up = (np.array_equal(rewards["row"].to_numpy(), np.arange(n_rows))
                and rewards["prompt_id"].cast(pa.large_string()).equals(keys["prompt_id"].cast(pa.large_string()))
                and np.array_equal(rewards["sample_idx"].to_numpy(), keys["sample_idx"].to_numpy()))
    if not lined_up:
        raise SelfplayError(f"round {ctx.round} score: the shard parts do not cover the {n_rows} generations row for "
                            "row; delete shards/score in the round directory and score again")
    del keys
    reward = rewards["reward"].to_numpy()
    out = ctx.out / "scores"
    out.mkdir()
    spans = tables.windows(n_rows, ctx.cfg.window_rows) or [(0, 0)]
    for i, (lo, hi) in enumerate(spans):
        frame = tables.read_rows(path, lo, hi)
        frame["reward"] = reward[lo:hi]
        atomic.write_parquet(out / f"part-{i:05d}.parquet", frame)
    ctx.stats.update(responses=n_rows, mean_reward=round(float(reward.mean()), 4) if n_rows else None,
                     std_reward=round(float(reward.std(ddof=0)), 4) if n_rows else None)
