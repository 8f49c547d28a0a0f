"""The embedded default, for real: SmolLM2-135M-Instruct from the GGUF shipped on PyPI, the built-in IFEval-style
prompts and judge, one short round (experiment=smoke). Nothing is downloaded."""

import json

import pandas as pd
import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow


def test_embedded_default_smoke_round(tmp_path, selfplay_cache):
    proc = run_cli("run", "experiment=smoke", f"output_root={tmp_path}", "prompts.per_round=12", "sampler.n=3",
                   env={"SELFPLAY_CACHE": str(selfplay_cache)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rdir = tmp_path / "smoke" / "round_00"
    prompts = pd.read_parquet(rdir / "prompts.parquet")
    assert len(prompts) == 12 and prompts["constraints"].map(lambda c: 1 <= len(json.loads(c)) <= 3).all()
    scores = pd.read_parquet(rdir / "scores" / "part-00000.parquet")
    assert scores["reward"].between(0, 1).all()
    # graded, not binary: fractions of satisfied constraints appear
    assert scores["reward"].nunique() >= 2
    # a real instruct model answers in words, through its chat template
    assert scores["response"].str.split().map(len).median() >= 5
    heldout = pd.read_parquet(rdir / "eval_base_generations.parquet")
    assert not set(heldout["prompt"]) & set(prompts["prompt"])  # held-out prompts never trained on
    ev = json.loads((rdir / "eval.json").read_text())
    assert ev["heldout_prompts"] == 8 and 0 <= ev["mean_reward"] <= 1
    assert (rdir / "policy" / "model.safetensors").exists()
    # The smoke round is one optimizer step or a few: it still moves the policy (the train stage checks it too).
    from selfplay.stages.train import changed_tensor

    train = json.loads((rdir / "train.done.json").read_text())["stats"]
    assert train["steps"] >= 1 and train["first_changed_tensor"]
    assert changed_tensor(selfplay_cache / "smollm2-135m-instruct", rdir / "policy") is not None
