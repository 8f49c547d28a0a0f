"""prompts — the prompts of one round.

Output:  round_XX/prompts.parquet   prompt_id, prompt (+ any other columns of the source; the reward function
                                     receives them as keyword lists, e.g. the built-in judge's `constraints`)
Source:  `prompts.source=builtin` draws fresh IFEval-style tasks each round (seeded by `seed` and the round);
         a file (.parquet/.jsonl/.json/.csv) is read in order, `prompts.per_round` rows a round, wrapping around.
Alone:   selfplay stage prompts round=R
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..config import round_seed
from ..errors import InputError

OUTPUTS = ("prompts.parquet",)
CONFIG = ("prompts", "seed")
HELDOUT_SEED = 20_250_302  # fixed, so every run and seed is evaluated on the same held-out prompts


def requires(r: int) -> list[tuple[int, str]]:
    return []


def read_prompt_file(path: str, column: str, id_column: str | None) -> pd.DataFrame:
    """A prompt table with prompt_id and prompt columns; clear errors for anything unusable."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"prompts file {file} does not exist")
    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(file)
        elif suffix in (".jsonl", ".json"):
            df = pd.read_json(file, lines=suffix == ".jsonl")
        elif suffix == ".csv":
            df = pd.read_csv(file)
        else:
            raise InputError(f"prompts file {file}: unsupported type {suffix!r} (use .parquet, .jsonl, .json or .csv)")
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"prompts file {file}: cannot be read ({type(err).__name__}: {err})") from err
    if df.empty:
        raise InputError(f"prompts file {file}: no rows")
    if column not in df.columns:
        raise InputError(f"prompts file {file}: no column {column!r} (columns: {list(df.columns)}); set prompts.column")
    df = df.rename(columns={column: "prompt"})
    if id_column is not None:
        if id_column not in df.columns:
            raise InputError(f"prompts file {file}: no id column {id_column!r}; set prompts.id_column or null")
        df = df.rename(columns={id_column: "prompt_id"})
        df["prompt_id"] = df["prompt_id"].astype(str)
        dup = df["prompt_id"][df["prompt_id"].duplicated()]
        if len(dup):
            raise InputError(f"prompts file {file}: duplicate prompt id {dup.iloc[0]!r} (row {dup.index[0]})")
    else:
        df.insert(0, "prompt_id", [f"{file.stem}-{i:06d}" for i in range(len(df))])
    bad = df.index[~df["prompt"].map(lambda p: isinstance(p, str) and p.strip() != "")]
    if len(bad):
        raise InputError(f"prompts file {file}: row {bad[0]} has an empty or non-text prompt")
    return df.reset_index(drop=True)


def train_prompts(cfg, r: int) -> pd.DataFrame:
    p = cfg.prompts
    if p.source == "builtin":
        from ..rewards.ifeval import build_prompts

        # One-constraint tasks have few distinct texts: skip any that is also a held-out prompt, so the held-out
        # reward measures generalisation. build_prompts is prefix-stable, so drawing more keeps the first rows.
        heldout = set(heldout_prompts(cfg)["prompt"])
        drawn = p.per_round
        while True:
            rows = build_prompts(drawn, seed=round_seed(cfg.seed, r), id_prefix=f"r{r:02d}-")
            fresh = [row for row in rows if row["prompt"] not in heldout]
            if len(fresh) >= p.per_round:
                return pd.DataFrame(fresh[: p.per_round])
            drawn *= 2
    df = read_prompt_file(p.source, p.column, p.id_column)
    if p.eval_source is None:  # the last eval_count rows are held out
        if len(df) <= p.eval_count:
            raise InputError(f"prompts file {p.source}: {len(df)} rows leave none for training after holding out "
                             f"prompts.eval_count={p.eval_count}; lower it or set prompts.eval_source")
        df = df.iloc[: len(df) - p.eval_count]
    rows = [(r * p.per_round + i) % len(df) for i in range(min(p.per_round, len(df)))]
    return df.iloc[rows].reset_index(drop=True)


def heldout_prompts(cfg) -> pd.DataFrame:
    p = cfg.prompts
    if p.source == "builtin":
        from ..rewards.ifeval import build_prompts

        return pd.DataFrame(build_prompts(p.eval_count, seed=HELDOUT_SEED, id_prefix="heldout-"))
    if p.eval_source is not None:
        return read_prompt_file(p.eval_source, p.column, p.id_column).head(p.eval_count)
    return read_prompt_file(p.source, p.column, p.id_column).tail(p.eval_count).reset_index(drop=True)


def run(ctx) -> None:
    df = train_prompts(ctx.cfg, ctx.round)
    df.to_parquet(ctx.out / "prompts.parquet", index=False)
    ctx.stats.update(rows=len(df))
