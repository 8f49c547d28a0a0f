"""Sampling engines that live across stages and rounds (a local `selfplay run`, a SLURM job's stages).

eval(r) and generate(r+1) sample from the same policy π_{r+1}: they share one engine. From one round to the next the
engine loads the new policy's weights in place (EnginePool.reload, vLLM's `reload_weights`) instead of starting
again — one engine start per run instead of two per round. After every load, and after the first start, the
weights probe (backends/weights_probe.py) compares the engine's log-probs with the policy on disk and stops the run
if they disagree: no round samples from stale weights.

    with keep_engines():                       # the runner, around the stages it runs
        ... VLLMSampler: pool, served = active_keeper().acquire(spec, …)

Outside `keep_engines` (a lone `selfplay stage`) every sampler starts and stops its own engines, as before. An
engine is reused only for the same engine settings (everything but the weights) and a checkpoint of the same
architecture and tokenizer (`same_model_family`); anything else starts a new engine. Only CPU engines are kept:
on a GPU, margin, train and reward scoring need the device's memory between two sampling stages (keeping a GPU
engine asleep there, vLLM's sleep mode, is not built).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from selfplay.backends.vllm_engine import EnginePool, EngineSpec

log = logging.getLogger("selfplay")

# config.json keys that differ between checkpoints of one model without changing what the engine computes
CONFIG_KEYS_FREE_TO_DIFFER = frozenset({"torch_dtype", "dtype", "transformers_version", "use_cache", "_name_or_path"})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")

_KEEPER: ContextVar[EngineKeeper | None] = ContextVar("selfplay_engine_keeper", default=None)


def same_model_family(a: str | Path, b: str | Path) -> bool:
    """Whether checkpoint b can be loaded into an engine built for a: the same config.json (but for the keys in
    CONFIG_KEYS_FREE_TO_DIFFER) and byte-identical tokenizer files."""
    a, b = Path(a), Path(b)
    try:
        configs = [json.loads((p / "config.json").read_text()) for p in (a, b)]
    except (OSError, ValueError):
        return False
    first, second = ({k: v for k, v in c.items() if k not in CONFIG_KEYS_FREE_TO_DIFFER} for c in configs)
    if first != second:
        return False
    for name in TOKENIZER_FILES:
        there = [(p / name).is_file() for p in (a, b)]
        if there[0] != there[1] or (there[0] and (a / name).read_bytes() != (b / name).read_bytes()):
            return False
    return True


class EngineKeeper:
    """Holds at most one EnginePool between the stages of one process; see the module docstring."""

    def __init__(self) -> None:
        self.pool: EnginePool | None = None
        self._key: Any = None
        self.starts = 0
        self.loads = 0

    def acquire(self, spec: EngineSpec, num_engines: int, ray_address: str | None, ray_num_cpus: int | None,
                probe: Callable[[EnginePool], dict]) -> tuple[EnginePool, dict]:
        """A running pool with `spec`'s weights, and how it was served: {"engine": "started" | "reloaded" |
        "kept", "engine_start_s" | "weights_load_s", "probe": …}. The probe runs after a start and a reload."""
        key = (json.dumps(asdict(replace(spec, model="")), sort_keys=True), num_engines, ray_address, ray_num_cpus)
        pool = self.pool
        if pool is not None and key == self._key and same_model_family(pool.spec.model, spec.model):
            if pool.spec.model == spec.model:
                return pool, {"engine": "kept"}
            served = {"engine": "reloaded", "weights_load_s": round(pool.reload(spec.model), 2)}
            self.loads += 1
            return pool, {**served, "probe": self._probed(pool, probe)}
        self.close()
        pool = EnginePool(spec, num_engines, ray_address, ray_num_cpus).__enter__()
        self.pool, self._key = pool, key
        self.starts += 1
        return pool, {"engine": "started", "engine_start_s": round(pool.start_seconds, 2),
                      "probe": self._probed(pool, probe)}

    def _probed(self, pool: EnginePool, probe: Callable[[EnginePool], dict]) -> dict:
        try:
            return probe(pool)
        except BaseException:
            self.close()  # an engine with the wrong weights serves nothing more
            raise

    def close(self) -> None:
        pool, self.pool, self._key = self.pool, None, None
        if pool is not None:
            pool.__exit__(None, None, None)


@contextlib.contextmanager
def keep_engines(enabled: bool = True) -> Iterator[EngineKeeper | None]:
    """Within the block, samplers take their engines from one EngineKeeper (closed when the block ends)."""
    if not enabled:
        yield None
        return
    keeper = EngineKeeper()
    token = _KEEPER.set(keeper)
    try:
        yield keeper
    finally:
        _KEEPER.reset(token)
        keeper.close()


def active_keeper() -> EngineKeeper | None:
    return _KEEPER.get()
