"""vLLM sampler: prompts stream to `sampler.num_engines` engines (Ray actors) in chunks of `batch_size` prompts.

The prompt ids come from the same `generation_prompt_ids` the hf sampler and the trainer use (the engine's own
template is never applied), and responses are decoded here with the same tokenizer. Each (prompt, sample) gets its
own seed from (seed, prompt key, sample index), so a response does not depend on the batch, the engine or N.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from selfplay.backends.chat import generation_prompt_ids
from selfplay.backends.engine_keeper import active_keeper
from selfplay.backends.modeling import load_tokenizer
from selfplay.backends.precision import engine_dtype, train_bf16
from selfplay.backends.samplers.base import Completion, Sampler, SamplingSpec, completion_from_tokens
from selfplay.backends.vllm_engine import EnginePool, engine_spec
from selfplay.backends.weights_probe import ProbeSettings, check_engine_weights
from selfplay.errors import InputError

log = logging.getLogger("selfplay")


def request_seed(seed: int, key: str, sample_idx: int) -> int:
    """A 63-bit seed per response, independent of where the prompt sits in the list or which engine runs it."""
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{sample_idx}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def eos_token_ids(model_path: Path, tokenizer: Any) -> list[int]:
    """The ids that end a turn: the generation config's eos ids (as transformers' generate uses) and the tokenizer's
    eos id, which vLLM always stops at as well — so a response ends with one of these exactly when it stopped."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


class VLLMSampler(Sampler):
    def __init__(self, model_path: Path, dtype: str, device: Any, trust_remote_code: bool = False, *,
                 sampler_cfg: Any, ray_cfg: Any, probe_dtype: str = "float32", probe_bf16: bool = False):
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.eos_ids = eos_token_ids(model_path, self.tokenizer)
        self.spec = engine_spec(model_path, dtype, device, sampler_cfg, trust_remote_code)
        self.num_engines = sampler_cfg.num_engines
        self.overlong = sampler_cfg.overlong_prompts
        self.ray_cfg = ray_cfg
        self.skipped_overlong = 0
        self.timings: dict[str, float] = {"engine_start_s": 0.0, "generation_s": 0.0}
        self._pool: EnginePool | None = None
        self._kept = False  # the pool belongs to the run's EngineKeeper, which closes it
        self.served: list[dict] = []  # how each start of this sampler got its engines (the stage's manifest)
        self.probe_settings = ProbeSettings(model_path=str(model_path), dtype=probe_dtype,
                                            bf16=probe_bf16, trust_remote_code=trust_remote_code)

    @classmethod
    def from_config(cls, cfg: Any, model_path: Path, device: Any) -> VLLMSampler:
        # the probe computes the policy's log-probs as the margin stage does: model.dtype, at the run's precision
        return cls(model_path=model_path, dtype=engine_dtype(cfg), device=device,
                   trust_remote_code=cfg.model.trust_remote_code, sampler_cfg=cfg.sampler, ray_cfg=cfg.ray,
                   probe_dtype=cfg.model.dtype, probe_bf16=train_bf16(cfg))

    def __enter__(self) -> VLLMSampler:
        """Keep the engines up across calls (a stage's checkpointed windows) until the block ends."""
        super().__enter__()
        self._start()
        return self

    def _start(self) -> None:
        # GPU engines are not kept: margin, train and reward scoring need the device between two sampling stages
        keeper = None if self.spec.use_gpu else active_keeper()
        if keeper is None:  # engines of this sampler alone
            self._pool = EnginePool(self.spec, self.num_engines, self.ray_cfg.address, self.ray_cfg.num_cpus).__enter__()
            self.timings["engine_start_s"] += round(self._pool.start_seconds, 2)
            self.served.append({"engine": "started", "engine_start_s": round(self._pool.start_seconds, 2)})
            return
        # the run's engines: started once, reloaded with this policy's weights, or kept; probed after every load
        self._pool, served = keeper.acquire(self.spec, self.num_engines, self.ray_cfg.address, self.ray_cfg.num_cpus,
                                            probe=lambda pool: check_engine_weights(pool, self.probe_settings))
        self._kept = True
        self.timings["engine_start_s"] += served.get("engine_start_s", 0.0)
        self.timings["weights_load_s"] = round(self.timings.get("weights_load_s", 0.0)
                                               + served.get("weights_load_s", 0.0), 2)
        self.served.append(served)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and not self._kept:
            pool.__exit__(None, None, None)

    def __call__(self, prompts: list[str], spec: SamplingSpec, desc: str = "generate",
                 keys: list[str] | None = None) -> list[Completion]:
        keys = keys if keys is not None else [str(i) for i in range(len(prompts))]
        encoded = [generation_prompt_ids(self.tokenizer, p) for p in prompts]
        # A prompt needs room for at least one response token within max_model_len.
        limit = self.spec.max_model_len - 1
        overlong = [i for i, ids in enumerate(encoded) if len(ids) > limit]
        if overlong and self.overlong == "fail":
            i = overlong[0]
            raise InputError(f"prompt {keys[i]!r} has {len(encoded[i])} tokens, over sampler.max_model_len="
                             f"{self.spec.max_model_len} ({len(overlong)} such prompts; sampler.overlong_prompts=skip "
                             f"skips them)")
        if overlong:
            log.warning("%s: %d prompts longer than sampler.max_model_len=%d skipped", desc, len(overlong),
                        self.spec.max_model_len)
        self.skipped_overlong += len(overlong)
        skip = set(overlong)
        # Chunks are fixed ranges of the list (skipped prompts leave a chunk smaller), so a shard — a range of whole
        # chunks — runs exactly the single-process run's chunks.
        chunks = [chunk for s in range(0, len(prompts), spec.batch_size)
                  if (chunk := [i for i in range(s, min(s + spec.batch_size, len(prompts))) if i not in skip])]
        requests = [[(encoded[i], request_seed(spec.seed, keys[i], k)) for i in chunk for k in range(spec.n)]
                    for chunk in chunks]
        params = dict(max_tokens=spec.max_new_tokens, stop_token_ids=self.eos_ids, skip_special_tokens=True,
                      detokenize=False)
        if spec.greedy:
            params.update(temperature=0.0)
        else:
            params.update(temperature=spec.temperature, top_p=spec.top_p)
        with self.engines_for_call():  # outside a `with sampler:` block the engines live for this call only
            if self._pool is None:
                self._start()
            started = time.time()
            outputs = self._pool.map("generate", requests, params, desc=desc, unit="resp",
                                     count=lambda _, result: sum(len(ids) for ids, _ in result))
            self.timings["generation_s"] = round(self.timings["generation_s"] + time.time() - started, 2)
        results: list[Completion] = []
        for chunk, chunk_out in zip(chunks, outputs, strict=True):
            # the engine stops at an end-of-turn id, so "stop" ⇔ the ids end with one (finish reason not needed)
            results.extend(completion_from_tokens(self.tokenizer, tokens, self.eos_ids, chunk[row // spec.n], row % spec.n)
                           for row, (tokens, _) in enumerate(chunk_out))
        results.sort(key=lambda c: (c.prompt_index, c.sample_idx))
        return results
