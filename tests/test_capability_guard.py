"""The capability guard (issue 21): checker families only the eval uses, and a drift figure that needs no judge."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from conftest import run_cli, tiny_overrides

from selfplay.rewards.ifeval import family


def test_eval_only_families_stay_out_of_training_and_eval_reports_both_sides_and_the_drift(tmp_path, tiny_policy):
    overrides = tiny_overrides(tmp_path, tiny_policy, None, run_name="guard")
    proc = run_cli("run", *overrides, "rounds=1", "prompts.per_round=12", "prompts.eval_count=12",
                   "prompts.eval_only_families=[keywords,detectable_format]", "eval.drift=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rdir = tmp_path / "guard" / "round_00"
    trained = {family(c["id"]) for cs in pd.read_parquet(rdir / "prompts.parquet")["constraints"] for c in json.loads(cs)}
    assert trained and not trained & {"keywords", "detectable_format"}
    ev = json.loads((rdir / "eval.json").read_text())
    assert ev["heldout_prompts_trained_families"] + ev["heldout_prompts_unseen_families"] == 12
    assert ev["heldout_prompts_unseen_families"] >= 1
    # the split's figures are the per-prompt rewards of each side, recomputed from the files
    policy = pd.read_parquet(rdir / "eval_generations.parquet")
    base = pd.read_parquet(rdir / "eval_base_generations.parquet")
    prompts = policy.drop_duplicates("prompt_id").set_index("prompt_id")
    from selfplay.backends.prompt_sources import heldout_prompts
    from selfplay.runner.slurm import compose

    held = heldout_prompts(compose([*overrides, "prompts.eval_count=12"])).set_index("prompt_id")
    unseen = held["constraints"].map(lambda cs: any(family(c["id"]) in ("keywords", "detectable_format")
                                                    for c in json.loads(cs)))
    ids = unseen.index[unseen]
    assert ev["mean_reward_unseen_families"] == policy[policy["prompt_id"].isin(ids)]["reward"].mean()
    gain = (policy.set_index("prompt_id")["reward"] - base.set_index("prompt_id")["reward"]).loc[ids].mean()
    assert np.isclose(ev["gain_unseen_families"], gain) and len(prompts) == 12
    # drift: π_0's answers under π_1 minus under π_0; a policy that trained has moved
    assert np.isfinite(ev["drift_logp_per_token"]) and ev["drift_logp_per_token"] != 0
    assert ev["drift_logp_per_token"] == ev["base_responses_logp_per_token"] - ev["base_responses_logp_per_token_pi0"]
    summary = json.loads((tmp_path / "guard" / "summary.json").read_text())[0]
    assert np.isclose(summary["drift_logp_per_token"], ev["drift_logp_per_token"], rtol=1e-3)  # 4 digits kept
    assert "drift of π_r+1" in (tmp_path / "guard" / "report.md").read_text()


def test_eval_only_families_are_checked_at_start_up(tmp_path, tiny_policy):
    overrides = tiny_overrides(tmp_path, tiny_policy, None, run_name="guard_bad")
    proc = run_cli("run", *overrides, "prompts.eval_only_families=[keyword]")
    assert proc.returncode == 2 and "prompts.eval_only_families: unknown famil(ies) ['keyword']" in proc.stderr
    assert not (tmp_path / "guard_bad").exists()
