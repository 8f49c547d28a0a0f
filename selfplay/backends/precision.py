"""Compute precision: bf16 on the matrix units where the processor has them, fp32 elsewhere.

`precision` is one switch for every stage that runs a model (generate, score, margin, REAL embeddings, train, eval):

  fp32   weights and arithmetic in model.dtype (float32 by default), as before this switch existed;
  bf16   training and the margin stage (whose log-probs are DPO's reference) compute under torch.autocast: matrix
         products in bfloat16 with fp32 accumulation, weights and the optimizer's master copy in model.dtype (TRL's
         bf16=True, accelerate's autocast); reward scoring and REAL embeddings autocast too; the samplers, which never
         train, hold their weights in bfloat16 (hf: autocast would re-cast every weight at every decode step; vLLM
         has no autocast), with eager attention on a CPU, where PyTorch's flash kernel is slower in bf16 than fp32;
  auto   bf16 where the device computes it natively (a CUDA GPU with bf16; a CPU with AMX-BF16 tiles or AVX512-BF16
         dot products, read from the processor's flags), else fp32, said once in the log.

The switch is resolved once at start-up (`resolve`), so the manifests record what ran: "bf16" or "fp32", never "auto",
and a resume on a machine that resolves differently is refused rather than mixing precisions within a round.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from selfplay.backends.modeling import torch_device

log = logging.getLogger("selfplay")

PRECISIONS = ("auto", "fp32", "bf16")

# Linux's names for the CPU features that make bf16 matrix products faster than fp32 ones, best first.
CPU_BF16_FLAGS = (("amx_bf16", "AMX-BF16 tiles"), ("avx512_bf16", "AVX512-BF16"))


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The processor's feature flags (empty where /proc/cpuinfo does not exist, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_bf16_unit(flags: set[str] | None = None) -> str | None:
    """The CPU's native bf16 matrix unit (e.g. "AMX-BF16 tiles"), or None when it has none."""
    flags = cpu_flags() if flags is None else flags
    return next((name for flag, name in CPU_BF16_FLAGS if flag in flags), None)


def cpu_class(flags: set[str] | None = None) -> str:
    """The processor class recorded beside every measured figure: "amx", "avx512bf16", "avx2" or "other"
    (scripts/cpu_class.sh reads the same flags for CI)."""
    flags = cpu_flags() if flags is None else flags
    return next((name for flag, name in (("amx_bf16", "amx"), ("avx512_bf16", "avx512bf16"), ("avx2", "avx2"))
                 if flag in flags), "other")


def native_bf16(device: Any, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether `device` computes bf16 matrix products natively, and what was found."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "CUDA bf16" if ok else "a CUDA device without bf16"
    unit = cpu_bf16_unit(flags)
    return unit is not None, unit or "no AMX-BF16 or AVX512-BF16 on this CPU"


def resolve(cfg: Any, flags: set[str] | None = None) -> str:
    """`precision` as it will run ("bf16" or "fp32"), logged once; cfg must still be writable."""
    device = torch_device(cfg.device)
    ok, found = native_bf16(device, flags)
    if cfg.precision == "auto":
        cfg.precision = "bf16" if ok else "fp32"
        log.info("precision=auto: %s on %s (%s)", cfg.precision, device.type, found)
    elif cfg.precision == "bf16" and not ok:
        log.warning("precision=bf16 on %s with %s: bf16 runs emulated, slower than fp32", device.type, found)
    return cfg.precision


def stage_bf16(cfg: Any) -> bool:
    """bf16 autocast for the stages that run a model without training it (generate, score, REAL, eval). A config
    composed outside the CLI may still say auto: it resolves here as `resolve` would, without the log line."""
    if cfg.precision == "auto":
        return native_bf16(torch_device(cfg.device))[0]
    return cfg.precision == "bf16"


def train_bf16(cfg: Any) -> bool:
    """bf16 for training and for the margin stage, whose log-probs are DPO's reused reference log-probs: both must
    run under the same precision for the first loss to be ln 2: `precision`, as every other stage."""
    return stage_bf16(cfg)


def autocast(enabled: bool, device: Any) -> Any:
    """torch.autocast to bf16 on the device when enabled, else a no-op context."""
    if not enabled:
        return nullcontext()
    import torch

    return torch.autocast(device_type=getattr(device, "type", str(device)), dtype=torch.bfloat16)


def engine_dtype(cfg: Any, dtype: str | None = None) -> str:
    """The weights dtype for a vLLM engine, which has no autocast: bfloat16 under precision=bf16 where the configured
    dtype (model.dtype unless given) is float32; a 16-bit dtype or auto is kept."""
    dtype = cfg.model.dtype if dtype is None else dtype
    return "bfloat16" if stage_bf16(cfg) and dtype == "float32" else dtype
