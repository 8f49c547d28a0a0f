"""Reward backends (selfplay/backends/base.py). `build_scorer(cfg, device)` gives `scorer(frame, desc) -> pd.Series`:
one finite float per row of a generations frame (columns prompt, response, and the prompt's extra columns), indexed
by row position. Each backend scores a frame in a fixed schedule of batches that depends on the frame alone; the
score stage calls it once per window of the round's generations (selfplay/rundir/tables.py) inside a `with` block,
which keeps a model or engine loaded across the windows."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from selfplay.backends.base import Backend
from selfplay.backends.batching import token_budget_batches
from selfplay.backends.chat import reward_input_ids
from selfplay.backends.modeling import load_reward_model, load_tokenizer, resolve_model_path
from selfplay.backends.precision import autocast, engine_dtype, stage_bf16
from selfplay.backends.vllm_engine import EngineMap, engine_spec
from selfplay.errors import InputError

Scorer = Backend  # called as scorer(frame, desc) -> pd.Series
RESERVED = {"prompt", "response", "prompt_id", "sample_idx", "n_tokens", "finish_reason"}


def load_function(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"reward.function: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise InputError(f"reward.function: {module_name!r} has no function {attr!r}")
    return fn


def check_rewards(values: Any, expected: int, source: str, frame: pd.DataFrame, where: str = "") -> np.ndarray:
    """Rewards as a float array; one clear error for a wrong length or a NaN/inf value (naming the row)."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"{source} returned values that are not numbers{where} ({err})") from err
    if arr.shape != (expected,):
        raise InputError(f"{source} returned shape {arr.shape} for {expected} responses{where}; expected one float "
                         "per response")
    bad = np.flatnonzero(~np.isfinite(arr))
    if len(bad):
        i = int(bad[0])
        raise InputError(f"{source} returned {arr[i]} for prompt_id={frame['prompt_id'].iloc[i]!r} "
                         f"sample_idx={frame['sample_idx'].iloc[i]} ({len(bad)} non-finite rewards)")
    return arr


def _batch_label(spec: str, part: pd.DataFrame, start: int) -> str:
    first = part.iloc[0]
    return (f"reward function {spec} on the batch of rows {start}–{start + len(part) - 1} (first: prompt_id="
            f"{first['prompt_id']!r} sample_idx={first['sample_idx']})")


def call_reward_function(fn: Callable, spec: str, part: pd.DataFrame, start: int, kwargs: dict) -> np.ndarray:
    """One batch through a reward function under TRL's contract (a list of floats, one per completion): anything
    else, or an exception inside the function, becomes one error naming the function, the batch and what came back."""
    try:
        values = fn(prompts=list(part["prompt"]), completions=list(part["response"]), **kwargs)
    except Exception as err:  # noqa: BLE001 — the user's code; its own message is kept in ours
        raise InputError(f"{_batch_label(spec, part, start)} raised {type(err).__name__}: "
                         f"{str(err).splitlines()[0][:300] if str(err) else '(no message)'}") from err
    if values is None or isinstance(values, (str, bytes, dict)) or np.ndim(values) != 1:
        shown = repr(values)[:80]
        raise InputError(f"{_batch_label(spec, part, start)} returned {type(values).__name__} {shown}; it must return "
                         f"a list of {len(part)} floats, one per completion")
    return check_rewards(values, len(part), f"reward function {spec}", part,
                         where=f" in the batch of rows {start}–{start + len(part) - 1}")


class FunctionScorer(Backend):
    """reward.backend=function: a Python reward function under TRL's contract, called on chunks of rows."""

    def __init__(self, spec: str, chunk: int = 512):
        self.spec, self.chunk = spec, chunk
        self.fn = load_function(spec)
        params = inspect.signature(self.fn).parameters
        self.params = set(params)
        self.takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.required = [name for name, p in params.items() if p.default is inspect.Parameter.empty
                         and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                         and name not in ("prompts", "completions")]

    @classmethod
    def from_config(cls, cfg: Any, device: Any) -> FunctionScorer:
        return cls(cfg.reward.function)

    def __call__(self, frame: pd.DataFrame, desc: str = "score") -> pd.Series:
        extra = [c for c in frame.columns if c not in RESERVED and c != "reward" and (self.takes_any or c in self.params)]
        absent = [name for name in self.required if name not in extra]
        if absent:
            raise InputError(f"reward function {self.spec} needs the column(s) {absent}, which the rows do not have "
                             f"(columns: {sorted(c for c in frame.columns if c not in RESERVED)}); give them in the "
                             "prompt file, or choose a reward function that needs only prompts and completions")
        values: list[np.ndarray] = []
        for start in tqdm(range(0, len(frame), self.chunk), desc=desc, unit="chunk", dynamic_ncols=True):
            part = frame.iloc[start : start + self.chunk]
            kwargs = {c: list(part[c]) for c in extra}
            values.append(call_reward_function(self.fn, self.spec, part, start, kwargs))
        return pd.Series(np.concatenate(values) if values else np.empty(0), index=np.arange(len(frame)))


class ClassifierScorer(Backend):
    """reward.backend=hf_classifier: a sequence classifier's first logit, in token-budget batches in this process."""

    def __init__(self, model_dir: str, dtype: str, batch_size: int, max_length: int, device: Any,
                 trust_remote_code: bool, max_batch_tokens: int | None = None, bf16: bool = False):
        self.path = resolve_model_path(model_dir)
        self.tokenizer = load_tokenizer(Path(self.path), trust_remote_code)
        self.model = load_reward_model(Path(self.path), dtype, device, trust_remote_code)
        self.batch_size, self.max_length, self.max_batch_tokens = batch_size, max_length, max_batch_tokens
        self.device, self.bf16 = device, bf16

    @classmethod
    def from_config(cls, cfg: Any, device: Any) -> ClassifierScorer:
        r = cfg.reward
        return cls(r.model, r.dtype, r.batch_size, r.max_length, device, cfg.model.trust_remote_code,
                   r.max_batch_tokens, bf16=stage_bf16(cfg))

    def __call__(self, frame: pd.DataFrame, desc: str = "score") -> pd.Series:
        import torch

        encoded = [reward_input_ids(self.tokenizer, p, r, self.max_length)
                   for p, r in zip(frame["prompt"], frame["response"], strict=True)]
        # Token-budget batches, longest first (ties by row), fixed by the frame alone.
        batches = token_budget_batches([len(e) for e in encoded], self.batch_size, self.max_batch_tokens)
        order = [i for batch in batches for i in batch]
        out = np.empty(len(order))
        bar = tqdm(total=sum(len(encoded[i]) for i in order), desc=desc, unit="tok", unit_scale=True,
                   dynamic_ncols=True)
        start, pad_id = 0, self.model.config.pad_token_id
        for idx in batches:
            ids = torch.full((len(idx), max(len(encoded[i]) for i in idx)), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):  # right padding: sequence classifiers read the last non-pad token
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            with torch.inference_mode(), autocast(self.bf16, self.device):
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out[start : start + len(idx)] = logits[:, 0].float().cpu().numpy()
            start += len(idx)
            bar.update(int(mask.sum()))
        bar.close()
        values = pd.Series(out, index=np.asarray(order, dtype=np.int64)).sort_index()
        check_rewards(values.to_numpy(), len(values), f"reward model {self.path}", frame.iloc[values.index])
        return values


class VllmScorer(Backend):
    """reward.backend=vllm: the same classifier and inputs as ClassifierScorer, served by vLLM's pooling runner on
    Ray actors (selfplay/backends/base.py: outside a `with` block the engines live for one call)."""

    def __init__(self, model_dir: str, dtype: str, max_length: int, device: Any, trust_remote_code: bool,
                 sampler_cfg: Any, ray_cfg: Any):
        self.path = resolve_model_path(model_dir)
        self.tokenizer = load_tokenizer(Path(self.path), trust_remote_code)
        self.max_length = max_length
        spec = engine_spec(self.path, dtype, device, sampler_cfg, trust_remote_code, runner="pooling")
        spec.max_model_len = max(spec.max_model_len, max_length)
        self.engines = EngineMap(spec, sampler_cfg, ray_cfg)

    @classmethod
    def from_config(cls, cfg: Any, device: Any) -> VllmScorer:
        r = cfg.reward
        return cls(r.model, engine_dtype(cfg, r.dtype), r.max_length, device, cfg.model.trust_remote_code,
                   cfg.sampler, cfg.ray)

    def __call__(self, frame: pd.DataFrame, desc: str = "score") -> pd.Series:
        encoded = [reward_input_ids(self.tokenizer, p, r, self.max_length)
                   for p, r in zip(frame["prompt"], frame["response"], strict=True)]
        with self.engines_for_call():
            values = self.engines("classify", encoded, desc, tokens=len)
        return pd.Series(check_rewards(values, len(frame), f"reward model {self.path} (vllm)", frame),
                         index=np.arange(len(frame)))

    def close(self) -> None:
        self.engines.close()


# The registry: reward.backend → its scorer class, built from the run's config (vllm sizes its engines with the
# `sampler` group and joins `ray`). A new judge is a new entry.
SCORERS: dict[str, type[Backend]] = {"function": FunctionScorer, "vllm": VllmScorer,
                                     "hf_classifier": ClassifierScorer}


def build_scorer(cfg: Any, device: Any) -> Scorer:
    """The `reward.backend` scorer of a run's config: `scorer(frame, desc) -> pd.Series`; a stage that calls it window
    after window holds it in a `with` block, so an engine-backed scorer keeps its engines up between calls."""
    return SCORERS[cfg.reward.backend].from_config(cfg, device)
