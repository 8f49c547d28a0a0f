"""`selfplay select INPUT OUTPUT [overrides…]`: MAP (or any metric) on an existing preference dataset.

    selfplay select ultrafeedback.parquet selected.parquet model.path=/models/policy selection.top_k=20000
    selfplay select pairs.jsonl kept.jsonl model=local model.path=… reward=hf_classifier reward.model=/models/rm

INPUT is a .parquet, .jsonl, .json or .csv file of preference pairs in TRL's format: `prompt`, `chosen`, `rejected`,
each a string or a list of chat messages (UltraFeedback-binarized style, where chosen/rejected hold the whole
conversation, works too: the last user message is the prompt and the last assistant message the response). The
explicit margin comes from per-response scores (`score_chosen`/`score_rejected`, or `reward_chosen`/
`reward_rejected` as selfplay writes them); without them the configured judge (`reward=…`) scores both responses.
The implicit margin is computed under `model.path` exactly as a round's margin stage does (same chat template,
truncation and batching), then `selection.*` ranks the pool; the selection seed is that of a run's round 0 with the
same `seed`, so a round's candidate_pairs.parquet gives back that round's selected pairs.

OUTPUT gets the kept rows, best first, with the input's columns as they were plus margin_explicit, margin_implicit,
the log-probs behind it, metric, score and rank; its type follows its suffix (.parquet or .jsonl). Rows whose
scores differ by at most pair.min_margin are dropped as ties and counted, like the pair stage does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from selfplay.backends.chat import prompt_messages, response_messages
from selfplay.backends.logprob_scorer import pair_margins
from selfplay.backends.modeling import resolve_model_path, torch_device
from selfplay.config import round_seed
from selfplay.core.selection import PAIR_KEY
from selfplay.errors import InputError
from selfplay.rewards.scoring import build_scorer
from selfplay.rundir import atomic
from selfplay.stages.select import select_pool

log = logging.getLogger("selfplay")

SCORE_COLUMNS = (("score_chosen", "score_rejected"), ("reward_chosen", "reward_rejected"))
READERS = {".parquet": pd.read_parquet, ".jsonl": lambda f: pd.read_json(f, lines=True), ".json": pd.read_json,
           ".csv": pd.read_csv}


def read_pairs(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"selfplay select: input {path} does not exist")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise InputError(f"selfplay select: input {path}: unsupported type {path.suffix!r} (use {', '.join(READERS)})")
    try:
        df = reader(path)
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise InputError(f"selfplay select: input {path} cannot be read ({type(err).__name__}: {err})") from err
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in df.columns]
    if missing:
        raise InputError(f"selfplay select: input {path} has no column {missing[0]!r} (columns: {list(df.columns)}); "
                         "preference pairs need prompt, chosen and rejected")
    if df.empty:
        raise InputError(f"selfplay select: input {path} has no rows")
    return df.reset_index(drop=True)


def _text(value: Any, role: str, path: Path, row: int, column: str) -> str:
    """A plain string, or the content of the last `role` message of a chat-message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and len(value):
        for message in reversed(list(value)):
            if isinstance(message, dict) and message.get("role") == role and isinstance(message.get("content"), str):
                return message["content"]
    raise InputError(f"selfplay select: input {path} row {row} column {column!r}: expected text or chat messages with a "
                     f"{role!r} message, got {type(value).__name__}")


def to_pairs(df: pd.DataFrame, path: Path, scorer=None) -> pd.DataFrame:
    """The dataset as selfplay's pair columns (prompt_id, prompt/chosen/rejected messages, sample indices, rewards,
    margin_explicit), keeping the input row index."""
    prompts = [_text(v, "user", path, i, "prompt") for i, v in enumerate(df["prompt"])]
    chosen = [_text(v, "assistant", path, i, "chosen") for i, v in enumerate(df["chosen"])]
    rejected = [_text(v, "assistant", path, i, "rejected") for i, v in enumerate(df["rejected"])]
    for column, texts in (("prompt", prompts), ("chosen", chosen), ("rejected", rejected)):
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty and column == "prompt":
            raise InputError(f"selfplay select: input {path} row {empty[0]}: empty prompt ({len(empty)} such rows)")
    pairs = pd.DataFrame({
        "prompt_id": df["prompt_id"].astype(str) if "prompt_id" in df else [f"row-{i:07d}" for i in range(len(df))],
        "prompt": [prompt_messages(p) for p in prompts],
        "chosen": [response_messages(c) for c in chosen],
        "rejected": [response_messages(r) for r in rejected],
        "chosen_sample_idx": df["chosen_sample_idx"].astype(int) if "chosen_sample_idx" in df else 0,
        "rejected_sample_idx": df["rejected_sample_idx"].astype(int) if "rejected_sample_idx" in df else 1,
    })
    names = next(((c, r) for c, r in SCORE_COLUMNS if c in df and r in df), None)
    half = next((c if c in df else r for c, r in SCORE_COLUMNS if (c in df) != (r in df)), None)
    if half is not None:
        pair = next(p for p in SCORE_COLUMNS if half in p)
        raise InputError(f"selfplay select: input {path} has column {half!r} but not "
                         f"{next(c for c in pair if c != half)!r}; per-response scores come in pairs "
                         f"({' and '.join(pair)}), or leave both out to score with the judge (reward=…)")
    if names is not None:
        rewards = {side: pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
                   for side, col in zip(("chosen", "rejected"), names, strict=True)}
        for side, col in zip(("chosen", "rejected"), names, strict=True):
            bad = np.flatnonzero(~np.isfinite(rewards[side]))
            if len(bad):
                raise InputError(f"selfplay select: input {path} row {bad[0]} column {col!r}: not a finite number "
                                 f"({len(bad)} such rows)")
    else:
        if scorer is None:
            raise InputError(f"selfplay select: input {path} has no per-response scores (score_chosen/score_rejected "
                             "or reward_chosen/reward_rejected) and no judge to compute them")
        frame = pd.DataFrame({"prompt_id": np.tile(pairs["prompt_id"], 2), "prompt": prompts * 2,
                              "sample_idx": np.repeat([0, 1], len(pairs)), "response": chosen + rejected})
        values = scorer(frame, desc="judge").to_numpy()
        rewards = {"chosen": values[: len(pairs)], "rejected": values[len(pairs):]}
    pairs["reward_chosen"], pairs["reward_rejected"] = rewards["chosen"], rewards["rejected"]
    pairs["margin_explicit"] = pairs["reward_chosen"] - pairs["reward_rejected"]
    dup = pairs.duplicated(["prompt_id", "chosen_sample_idx", "rejected_sample_idx"])
    if dup.any():
        raise InputError(f"selfplay select: input {path} row {int(np.flatnonzero(dup)[0])}: prompt_id "
                         f"{pairs['prompt_id'][dup].iloc[0]!r} repeats; ids must be unique per pair")
    return pairs


def write_table(df: pd.DataFrame, path: Path) -> None:
    """All or nothing: a temp file beside the output, renamed into place."""
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".jsonl"):
        raise InputError(f"selfplay select: output {path}: unsupported type {suffix!r} (use .parquet or .jsonl)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp:
        if suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)


def select_dataset(cfg, source: Path, target: Path) -> dict[str, Any]:
    """Read, margin, select, write; returns counts for the command's summary line."""
    raw = read_pairs(source)
    device = torch_device(cfg.device)
    needs_judge = not any(c in raw and r in raw for c, r in SCORE_COLUMNS)
    pairs = to_pairs(raw, source, build_scorer(cfg, device) if needs_judge else None)
    pairs["input_row"] = np.arange(len(pairs))
    ties = pairs["margin_explicit"] <= cfg.pair.min_margin
    pairs = pairs[~ties].reset_index(drop=True)
    if pairs.empty:
        raise InputError(f"selfplay select: input {source}: every row's chosen score is at most the rejected one's "
                         f"+ pair.min_margin={cfg.pair.min_margin}; nothing to select")
    policy = resolve_model_path(cfg.model.path)
    scored = pair_margins(pairs, cfg, policy, device, "offline margin")
    empty = (scored["n_tokens_chosen"] == 0) | (scored["n_tokens_rejected"] == 0)
    scored = scored[~empty].reset_index(drop=True)
    selected = select_pool(scored, cfg, round_seed(cfg.seed, 0), policy, device)
    # The input's own columns, as they were, then what selection added.
    added = [c for c in selected.columns if c not in PAIR_KEY + ["prompt", "chosen", "rejected", "input_row"]]
    original = raw.iloc[selected["input_row"].to_numpy()].reset_index(drop=True)
    # What was computed here wins over an input column of the same name (e.g. a round's pairs.parquet under π_r).
    out = pd.concat([original.drop(columns=[c for c in added if c in original]), selected[added]], axis=1)
    write_table(out, target)
    return {"rows": len(raw), "ties_dropped": int(ties.sum()), "truncated_dropped": int(empty.sum()),
            "pool": len(scored), "selected": len(out)}
