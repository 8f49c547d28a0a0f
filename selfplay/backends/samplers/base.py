"""What every sampler backend shares: the Sampler interface, the request (SamplingSpec), the result (Completion) and
its table (completions_frame)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from selfplay.backends.base import Backend


@dataclass
class Completion:
    prompt_index: int  # position of the prompt in the request list
    sample_idx: int  # 0..n-1 within its prompt
    response: str
    n_tokens: int  # generated tokens, the end-of-turn token included when there was one
    finish_reason: str  # "stop" (end of turn) or "length" (hit max_new_tokens)


def completion_from_tokens(tokenizer: Any, tokens: list[int], eos_ids: set[int] | list[int], prompt_index: int,
                           sample_idx: int) -> Completion:
    """A Completion from a backend's generated ids: cut at the first end-of-turn id (which counts as generated),
    decoded without special tokens; no end-of-turn id means the length limit was hit."""
    end = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
    kept = tokens if end is None else tokens[:end]
    return Completion(prompt_index=prompt_index, sample_idx=sample_idx,
                      response=tokenizer.decode(kept, skip_special_tokens=True).strip(),
                      n_tokens=len(tokens) if end is None else end + 1,
                      finish_reason="length" if end is None else "stop")


@dataclass
class SamplingSpec:
    n: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0
    batch_size: int = 16
    # Global index of the first batch (a shard starts mid-list): the hf backend seeds each batch by its index.
    first_batch: int = 0
    # hf: sort prompts by length within consecutive windows of this many prompts (a multiple of batch_size) before
    # batching; 0 sorts the whole list. A window is then a unit of work a shard can take whole.
    sort_window: int = 0


class Sampler(Backend):
    """A sampler backend (selfplay/backends/base.py): a context manager that owns its engine for the block, called as
    `sampler(prompts, spec, desc, keys)`, which returns one Completion per (prompt, sample) that it ran.
    `skipped_overlong` counts the prompts it skipped for having no room for a response
    (sampler.overlong_prompts=skip); a backend that never skips keeps it at 0. `timings` holds its engine start-up
    seconds (`engine_start_s`) where it starts engines."""

    skipped_overlong: int = 0
    timings: dict[str, float]

    def __call__(self, prompts: list[str], spec: SamplingSpec, desc: str = "generate",
                 keys: list[str] | None = None) -> list[Completion]:
        raise NotImplementedError


def completions_frame(prompts: pd.DataFrame, completions: list[Completion]) -> pd.DataFrame:
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
