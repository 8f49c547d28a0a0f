"""Where prompts come from: the built-in IFEval-style generator or a prompt file (.parquet/.jsonl/.json/.csv), for
the training rounds (`train_prompts`: the prompts stage) and for the held-out set (`heldout_prompts`: the eval stage
and the pipeline's preflight). Files are checked row by row, and a bad row is named with its file and line."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from selfplay.backends.chat import generation_prompt_ids
from selfplay.backends.modeling import load_tokenizer, resolve_model_path
from selfplay.config import round_seed
from selfplay.errors import InputError
from selfplay.rewards.ifeval import build_prompts

log = logging.getLogger("selfplay")

HELDOUT_SEED = 20_250_302  # fixed, so every run and seed is evaluated on the same held-out prompts


def _bad_jsonl_line(file: Path) -> str | None:
    """Where a JSONL file stops being JSON: 'line N: why' (None when every line parses)."""
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as err:
                    return f"line {number} is not valid JSON: {err.msg} at column {err.colno}"
    return None


def _is_chat_messages(value) -> bool:
    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    return bool(items) and all(isinstance(m, dict) and "content" in m for m in items)


def _read_table(file: Path) -> pd.DataFrame:
    """The file's rows, by its suffix; a file that is missing, of another type or unreadable is one clear error."""
    if file.is_dir():
        raise InputError(f"prompts file {file} is a directory; give one .parquet, .jsonl, .json or .csv file")
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
        where = _bad_jsonl_line(file) if suffix == ".jsonl" and not isinstance(err, UnicodeDecodeError) else None
        raise InputError(f"prompts file {file}: cannot be read ({where or f'{type(err).__name__}: {err}'})") from err
    if df.empty:
        raise InputError(f"prompts file {file}: no rows")
    return df


def _prompt_table(df: pd.DataFrame, file: Path, column: str, id_column: str | None) -> pd.DataFrame:
    """The rows with `prompt` and `prompt_id` columns: the named columns (ids unique), or ids from the file's name."""
    if column not in df.columns:
        raise InputError(f"prompts file {file}: no column {column!r} (columns: {list(df.columns)}); set prompts.column")
    df = df.rename(columns={column: "prompt"})
    if id_column is None:
        df.insert(0, "prompt_id", [f"{file.stem}-{i:06d}" for i in range(len(df))])
        return df
    if id_column not in df.columns:
        raise InputError(f"prompts file {file}: no id column {id_column!r}; set prompts.id_column or null")
    df = df.rename(columns={id_column: "prompt_id"})
    df["prompt_id"] = df["prompt_id"].astype(str)
    dup = df["prompt_id"][df["prompt_id"].duplicated()]
    if len(dup):
        raise InputError(f"prompts file {file}: duplicate prompt id {dup.iloc[0]!r} (row {dup.index[0]})")
    return df


def read_prompt_file(path: str, column: str, id_column: str | None, invalid: str = "fail",
                     max_tokens: int | None = None, count_tokens: Callable[[list[str]], list[int]] | None = None
                     ) -> pd.DataFrame:
    """A prompt table with prompt_id and prompt columns; clear errors for anything unusable. Empty prompts and prompts
    over `max_tokens` (as `count_tokens` counts them) fail, or are dropped with `invalid="skip"` (counts in attrs)."""
    file = Path(path).expanduser()
    df = _prompt_table(_read_table(file), file, column, id_column)
    empty = ~df["prompt"].map(lambda p: isinstance(p, str) and p.strip() != "")
    chat = df["prompt"].map(_is_chat_messages)
    if chat.any():
        raise InputError(f"prompts file {file}: row {df.index[chat][0]} holds chat messages (a list of role/content "
                         f"dicts), not text ({int(chat.sum())} such rows); give the user's request as plain text: "
                         "selfplay applies the policy's chat template itself")
    if empty.any() and invalid == "fail":
        raise InputError(f"prompts file {file}: row {df.index[empty][0]} has an empty or non-text prompt "
                         f"({int(empty.sum())} such rows; prompts.invalid=skip drops them)")
    overlong = pd.Series(False, index=df.index)
    if max_tokens is not None and count_tokens is not None:
        lengths = pd.Series(0, index=df.index)
        lengths[~empty] = count_tokens(df.loc[~empty, "prompt"].tolist())
        overlong = lengths > max_tokens
        if overlong.any() and invalid == "fail":
            row = df.index[overlong][0]
            raise InputError(f"prompts file {file}: row {row} has {lengths[row]} tokens, over prompts.max_prompt_tokens="
                             f"{max_tokens} ({int(overlong.sum())} such rows; prompts.invalid=skip drops them)")
    kept = df[~empty & ~overlong].reset_index(drop=True)
    if kept.empty:
        raise InputError(f"prompts file {file}: no usable prompts ({int(empty.sum())} empty, {int(overlong.sum())} over "
                         f"prompts.max_prompt_tokens={max_tokens})")
    kept.attrs.update(skipped_empty=int(empty.sum()), skipped_overlong=int(overlong.sum()))
    if empty.any() or overlong.any():
        log.warning("prompts file %s: skipped %d empty and %d over-long prompts (prompts.invalid=skip)", file,
                    int(empty.sum()), int(overlong.sum()))
    return kept


def prompt_token_counter(cfg) -> Callable[[list[str]], list[int]]:
    """Counts prompts in tokens as the sampler sends them: the base policy's chat template with the generation
    prompt (the template is the same every round)."""
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path), cfg.model.trust_remote_code)
    return lambda prompts: [len(generation_prompt_ids(tokenizer, p)) for p in prompts]


def _read(cfg, path: str) -> pd.DataFrame:
    p = cfg.prompts
    counter = prompt_token_counter(cfg) if p.max_prompt_tokens is not None else None
    return read_prompt_file(path, p.column, p.id_column, p.invalid, p.max_prompt_tokens, counter)


def train_prompts(cfg, r: int) -> pd.DataFrame:
    p = cfg.prompts
    if p.source == "builtin":
        # One-constraint tasks have few distinct texts: skip any that is also a held-out prompt, so the held-out
        # reward measures generalisation. build_prompts is prefix-stable, so drawing more keeps the first rows.
        heldout = set(heldout_prompts(cfg)["prompt"])
        drawn = p.per_round
        while True:
            rows = build_prompts(drawn, seed=round_seed(cfg.seed, r), id_prefix=f"r{r:02d}-",
                                 word_budget=cfg.prompts.word_budget, exclude_families=list(p.eval_only_families))
            fresh = [row for row in rows if row["prompt"] not in heldout]
            if len(fresh) >= p.per_round:
                return pd.DataFrame(fresh[: p.per_round])
            drawn *= 2
    df = _read(cfg, p.source)
    skipped = dict(df.attrs)
    if p.eval_source is None:  # the last eval_count rows are held out
        if len(df) <= p.eval_count:
            raise InputError(f"prompts file {p.source}: {len(df)} rows leave none for training after holding out "
                             f"prompts.eval_count={p.eval_count}; lower it or set prompts.eval_source")
        df = df.iloc[: len(df) - p.eval_count]
    rows = [(r * p.per_round + i) % len(df) for i in range(min(p.per_round, len(df)))]
    out = df.iloc[rows].reset_index(drop=True)
    out.attrs.update(skipped)
    return out


def heldout_prompts(cfg) -> pd.DataFrame:
    p = cfg.prompts
    if p.source == "builtin":
        return pd.DataFrame(build_prompts(p.eval_count, seed=HELDOUT_SEED, id_prefix="heldout-",
                                          word_budget=p.word_budget))
    if p.eval_source is not None:
        return _read(cfg, p.eval_source).head(p.eval_count)
    return _read(cfg, p.source).tail(p.eval_count).reset_index(drop=True)
