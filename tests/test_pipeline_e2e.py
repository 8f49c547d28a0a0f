"""End to end through the real `selfplay` command on tiny random models: every output file and column, resume
after a kill, refusal of a changed config, and the other metrics/objectives through overrides."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli, start_cli, tiny_overrides

from selfplay.config import STAGES
from selfplay.core.selection import zscore

pytestmark = pytest.mark.slow

GEN_COLUMNS = ["prompt_id", "prompt", "sample_idx", "response", "n_tokens", "finish_reason"]
PAIR_COLUMNS = ["prompt_id", "prompt", "chosen", "rejected", "reward_chosen", "reward_rejected", "margin_explicit",
                "margin_implicit", "logp_chosen_sum", "logp_chosen_mean", "logp_rejected_sum", "logp_rejected_mean"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_policy, tiny_reward_model):
    out = tmp_path_factory.mktemp("runs")
    overrides = tiny_overrides(out, tiny_policy, tiny_reward_model)
    proc = run_cli("run", *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "tiny", overrides, proc


def test_every_stage_writes_the_design_layout(tiny_run):
    run_dir, _, proc = tiny_run
    assert (run_dir / "config.yaml").exists() and (run_dir / "report.md").exists()
    assert (run_dir / "reward_per_round.png").stat().st_size > 1000
    for r in range(2):
        rdir = run_dir / f"round_{r:02d}"
        for stage in STAGES:
            manifest = json.loads((rdir / f"{stage}.done.json").read_text())
            assert manifest["stage"] == stage and manifest["round"] == r
            for rel, meta in manifest["outputs"].items():
                assert (rdir / rel).stat().st_size == meta["bytes"]
        gens = pd.read_parquet(rdir / "generations" / "part-00000.parquet")
        assert gens.columns.tolist()[:6] == GEN_COLUMNS
        assert (gens.groupby("prompt_id").size() == 3).all() and gens["prompt_id"].nunique() == 6
        assert set(gens["finish_reason"]) <= {"stop", "length"}
        scores = pd.read_parquet(rdir / "scores" / "part-00000.parquet")
        assert scores.columns.tolist()[:6] == GEN_COLUMNS and "reward" in scores and np.isfinite(scores["reward"]).all()
        pairs = pd.read_parquet(rdir / "pairs.parquet")
        assert set(PAIR_COLUMNS) <= set(pairs.columns)
        assert (pairs["margin_explicit"] > 0).all()
        np.testing.assert_allclose(pairs["margin_explicit"], pairs["reward_chosen"] - pairs["reward_rejected"])
        # reference-free (SimPO-form) implicit margin: difference of mean token log-probs
        np.testing.assert_allclose(pairs["margin_implicit"], pairs["logp_chosen_mean"] - pairs["logp_rejected_mean"])
        pair_stats = json.loads((rdir / "pair.done.json").read_text())["stats"]
        assert pair_stats["pairs"] + pair_stats["ties_dropped"] == 6
        policy = rdir / "policy"
        assert (policy / "model.safetensors").exists() and (policy / "chat_template.jinja").exists()
        assert not (policy / "training_args.bin").exists()
        ev = json.loads((rdir / "eval.json").read_text())
        assert ev["heldout_prompts"] == 4 and 0 <= ev["win_rate_vs_base"] <= 1
        # the gain with its interval and paired test, recomputed from the two policies' held-out rewards
        base = pd.read_parquet(run_dir / "round_00" / "eval_base_generations.parquet").groupby("prompt_id")["reward"].mean()
        mine = pd.read_parquet(rdir / "eval_generations.parquet").groupby("prompt_id")["reward"].mean()
        diff = (mine - base.reindex(mine.index)).to_numpy()
        assert ev["reward_gain_vs_base"] == pytest.approx(diff.mean())
        assert ev["reward_gain_ci95_low"] <= ev["reward_gain_vs_base"] <= ev["reward_gain_ci95_high"]
        assert 0 < ev["reward_gain_p_value"] <= 1
        line = next(ln for ln in (proc.stderr + proc.stdout).splitlines() if f"round {r}: pairs" in ln)
        assert "95% CI [" in line and ", p " in line  # the per-round summary line


def test_selected_loads_with_datasets_and_map_scores_recompute(tiny_run):
    from datasets import load_dataset

    run_dir, _, _ = tiny_run
    for r in range(2):
        rdir = run_dir / f"round_{r:02d}"
        ds = load_dataset("parquet", data_files=str(rdir / "selected.parquet"), split="train")
        assert {"prompt", "chosen", "rejected", "metric", "score", "rank"} <= set(ds.column_names)
        assert ds[0]["chosen"][0]["role"] == "assistant"  # TRL's conversational preference format
        selected = pd.read_parquet(rdir / "selected.parquet")
        pool = pd.read_parquet(rdir / "pairs.parquet").sort_values("prompt_id").reset_index(drop=True)
        z = zscore(pool["margin_explicit"].to_numpy()) - 1.0 * zscore(pool["margin_implicit"].abs().to_numpy())
        expected = dict(zip(pool["prompt_id"], z, strict=True))
        np.testing.assert_allclose(selected["score"], [expected[p] for p in selected["prompt_id"]], atol=1e-9)
        # and from selected.parquet's own columns
        np.testing.assert_allclose(selected["score"], selected["z_margin_explicit"]
                                   - selected["map_weight"] * selected["z_abs_margin_implicit"], atol=1e-12)
        assert selected["rank"].tolist() == list(range(1, len(selected) + 1))
        assert len(selected) == int(np.ceil(0.5 * len(pool)))
        assert selected["score"].is_monotonic_decreasing


def test_round_folder_loads_as_a_dataset_through_its_card(tiny_run):
    from datasets import load_dataset

    run_dir, _, _ = tiny_run
    rdir = run_dir / "round_00"
    card = (rdir / "README.md").read_text()
    assert card.startswith("---\n") and "path: selected.parquet" in card
    # datasets reads the card's configs: only the selected pairs. A private cache: datasets' shared cache can serve
    # an earlier test session's round_00 for this path (seen: a stale row order).
    ds = load_dataset(str(rdir), cache_dir=str(run_dir.parent / "hf-datasets-cache"))
    selected = pd.read_parquet(rdir / "selected.parquet")
    assert list(ds) == ["train"] and ds["train"].num_rows == len(selected)
    assert ds["train"]["prompt_id"] == selected["prompt_id"].tolist()


def test_training_changed_the_policy(tiny_run, tiny_policy):
    from safetensors.torch import load_file

    run_dir, _, _ = tiny_run
    before = load_file(tiny_policy / "model.safetensors")
    after = load_file(run_dir / "round_00" / "policy" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not (before[k] == after[k]).all()]
    # every transformer weight moves; only embedding rows of unseen tokens stay (Adam leaves zero-grad rows alone)
    assert set(changed) >= {k for k in before if "layers" in k}


def test_status_reports_every_stage_complete(tiny_run):
    run_dir, _, _ = tiny_run
    proc = run_cli("status", str(run_dir), "--json")
    status = json.loads(proc.stdout)
    assert [row["round"] for row in status["rounds"]] == [0, 1] and status["missing"] == []
    assert all(st["state"] == "done" for row in status["rounds"] for st in row["stages"].values())
    assert status["rounds"][0]["stages"]["generate"]["rows"] == 18  # 6 prompts x 3 samples
    text = run_cli("status", str(run_dir)).stdout
    assert "16/16 stages complete" in text and "18r" in text


def test_status_json_lists_exactly_the_missing_stages(tiny_run, tmp_path):
    run_dir, _, _ = tiny_run
    copy = tmp_path / "half" / "tiny"
    shutil.copytree(run_dir, copy)
    (copy / "round_01" / "train.done.json").unlink()  # as if killed in round 1's training
    (copy / "round_01" / ".tmp-train").mkdir()
    (copy / "round_01" / "eval.done.json").unlink()
    shutil.rmtree(copy / "round_01" / "policy")
    status = json.loads(run_cli("status", str(copy), "--json").stdout)
    assert status["missing"] == ["round_01/train", "round_01/eval"]
    assert status["rounds"][1]["stages"]["train"]["state"] == "running"
    assert status["rounds"][1]["stages"]["eval"]["state"] == "missing"
    # asking about more rounds than exist lists the future ones too
    more = json.loads(run_cli("status", f"output_root={tmp_path / 'half'}", "run_name=tiny", "rounds=3",
                              "--json").stdout)
    assert more["missing"] == ["round_01/train", "round_01/eval"] + [f"round_02/{s}" for s in STAGES]


def test_rerun_skips_everything(tiny_run):
    run_dir, overrides, _ = tiny_run
    before = {p: p.read_bytes() for p in run_dir.glob("round_*/*.done.json")}
    proc = run_cli("run", *overrides)
    assert proc.returncode == 0
    assert "running" not in proc.stderr.replace("running (", "")  # no stage ran
    assert {p: p.read_bytes() for p in run_dir.glob("round_*/*.done.json")} == before


def test_changed_config_for_a_finished_stage_is_refused(tiny_run):
    run_dir, overrides, _ = tiny_run
    config_before = (run_dir / "config.yaml").read_text()
    proc = run_cli("run", *overrides, "sampler.temperature=0.5")
    assert proc.returncode == 2
    assert (run_dir / "config.yaml").read_text() == config_before  # still the config that made the outputs
    assert "round_00/generate already finished with a different config" in proc.stderr
    assert "sampler.temperature: 0.8 -> 0.5" in proc.stderr and "force=[generate]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_kill_during_training_then_resume_keeps_generation_and_scoring(tmp_path, tiny_policy, tiny_reward_model):
    overrides = [*tiny_overrides(tmp_path, tiny_policy, tiny_reward_model, run_name="killed"), "rounds=1",
                 "trainer.epochs=40", "trainer.save_steps=10"]  # ~80 steps: long enough to be killed mid-training
    proc = start_cli("run", *overrides)
    rdir = tmp_path / "killed" / "round_00"
    deadline = time.time() + 600
    while not list(rdir.glob(".checkpoints/train/*/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "training never saved a checkpoint"
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before the kill; raise trainer.epochs"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (rdir / "policy").exists() and not (rdir / "train.done.json").exists()
    done_before = {p.name: p.read_bytes() for p in rdir.glob("*.done.json")}
    assert set(done_before) == {f"{s}.done.json" for s in ("prompts", "generate", "score", "pair", "margin", "select")}
    data_before = {p: p.read_bytes() for p in rdir.glob("**/*.parquet")}

    resumed = run_cli("run", *overrides)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for stage in ("prompts", "generate", "score", "pair", "margin", "select"):
        assert f"round 0 {stage:<8} skipped (complete)" in resumed.stderr
        assert (rdir / f"{stage}.done.json").read_bytes() == done_before[f"{stage}.done.json"]
    assert all(p.read_bytes() == b for p, b in data_before.items())
    assert (rdir / "train.done.json").exists() and (rdir / "eval.json").exists()
    train = json.loads((rdir / "train.done.json").read_text())["stats"]
    assert train["resumed_from_step"] >= 10 and train["steps"] > train["resumed_from_step"]  # not from step 0
    assert "round 0 train: resuming from" in resumed.stderr
    assert not (rdir / ".checkpoints").exists()  # the committed stage's checkpoints are gone


def test_other_metrics_and_simpo_through_overrides(tiny_run, tmp_path, tiny_policy):
    # random selection + SimPO + a Python reward function, one round (the example override)
    proc = run_cli("run", *tiny_overrides(tmp_path, tiny_policy, None, run_name="simpo"), "rounds=1",
                   "selection.metric=random", "trainer=simpo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sel = pd.read_parquet(tmp_path / "simpo" / "round_00" / "selected.parquet")
    assert set(sel["metric"]) == {"random"}
    assert json.loads((tmp_path / "simpo" / "round_00" / "train.done.json").read_text())["stats"]["objective"] == "simpo"
    # the remaining metrics re-select round 0 of the finished tiny run
    run_dir, overrides, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy / "tiny")
    base = [o for o in overrides if not o.startswith("output_root=")] + [f"output_root={copy}"]
    pool = pd.read_parquet(copy / "tiny" / "round_00" / "pairs.parquet")
    for metric, expected_first in (("explicit", pool.loc[pool["margin_explicit"].idxmax(), "margin_explicit"]),
                                   ("implicit", pool["margin_implicit"].abs().min()), ("all", None)):
        proc = run_cli("stage", "select", "round=0", *base, f"selection={metric}", "force=[select]")
        assert proc.returncode == 0, proc.stderr[-2000:]
        sel = pd.read_parquet(copy / "tiny" / "round_00" / "selected.parquet")
        assert set(sel["metric"]) == {metric}
        if metric == "explicit":
            assert sel["margin_explicit"].iloc[0] == expected_first
        elif metric == "implicit":
            assert abs(sel["margin_implicit"].iloc[0]) == expected_first
        else:
            assert len(sel) == len(pool)


def test_all_tie_round_stops_with_a_clear_message(tmp_path, tiny_policy):
    proc = run_cli("run", *tiny_overrides(tmp_path, tiny_policy, None, run_name="ties"), "rounds=1",
                   "reward.function=rewards_for_tests:constant")
    assert proc.returncode == 2
    assert "no preference pairs to train on" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "ties" / "round_00" / "pair.done.json").read_text())["stats"]["ties_dropped"] == 6


def test_non_finite_reward_is_reported_with_its_row(tmp_path, tiny_policy):
    proc = run_cli("run", *tiny_overrides(tmp_path, tiny_policy, None, run_name="nan"), "rounds=1",
                   "reward.function=rewards_for_tests:not_finite")
    assert proc.returncode == 2
    assert "returned nan for prompt_id=" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "nan" / "round_00" / "scores").exists()


def test_stage_refuses_to_start_before_its_inputs(tmp_path, tiny_policy):
    proc = run_cli("stage", "score", "round=0", *tiny_overrides(tmp_path, tiny_policy, None, run_name="early"))
    assert proc.returncode == 2
    assert "needs round_00/generate, which has not finished" in proc.stderr


def test_dpo_form_margin_and_training_against_a_configured_reference(tiny_run, tmp_path, tiny_policy):
    run_dir, overrides, _ = tiny_run
    copy = tmp_path / "ref"
    shutil.copytree(run_dir, copy / "tiny")
    base = [o for o in overrides if not o.startswith("output_root=")] + [f"output_root={copy}",
                                                                          f"model.reference={tiny_policy}"]
    # A stage refuses to run on top of stages that finished with another config (check_upstream_configs): round 0's
    # margin, select and train are redone with the reference first, then round 1's.
    for r in (0, 1):
        for stage, force in (("margin", ["force=[margin]"]), ("select", []), ("train", ["force=[train]"])):
            proc = run_cli("stage", stage, f"round={r}", *base, *force)
            assert proc.returncode == 0, proc.stderr[-3000:]
    refused = run_cli("stage", "eval", "round=0", *[o for o in base if not o.startswith("model.reference=")])
    assert refused.returncode == 2 and re.search(r"round_00/eval reads round_00/(margin|train), which finished with a "
                                                 r"different config:\n +model\.reference: ", refused.stderr)
    pairs = pd.read_parquet(copy / "tiny" / "round_01" / "pairs.parquet")
    # ρ(y) = β·(log π_1(y|x) − log π_ref(y|x)), summed over tokens; β = trainer.beta = 0.1
    expected = 0.1 * ((pairs["logp_chosen_sum"] - pairs["ref_logp_chosen_sum"])
                      - (pairs["logp_rejected_sum"] - pairs["ref_logp_rejected_sum"]))
    np.testing.assert_allclose(pairs["margin_implicit"], expected, atol=1e-9)
    assert (pairs["logp_chosen_sum"] != pairs["ref_logp_chosen_sum"]).all()  # π_1 was trained away from π_0
    stats = json.loads((copy / "tiny" / "round_01" / "margin.done.json").read_text())["stats"]
    assert stats["form"] == "dpo"
    train = json.loads((copy / "tiny" / "round_01" / "train.done.json").read_text())
    assert train["config"]["model.reference"] == str(tiny_policy)
    # π_1 vs the π_0 reference: the first DPO loss is no longer ln 2. It is recorded to 5 decimals, and a reference
    # equal to the policy reads 0.69315 there exactly (test_precision.py); π_1 is one tiny round away, so the
    # difference can be a few 1e-5 (8e-5 on an avx2 CPU)
    assert abs(train["stats"]["first_loss"] - 0.69315) >= 1e-5


def test_round_cards_match_the_parquet_files_and_rebuild(tiny_run, tmp_path):
    run_dir, _, _ = tiny_run
    report = (run_dir / "report.md").read_text()
    assert "## Drift across rounds" in report and "| 95% interval | p (paired) |" in report
    for r in range(2):
        gens = pd.read_parquet(run_dir / f"round_{r:02d}" / "generations")
        pairs = pd.read_parquet(run_dir / f"round_{r:02d}" / "pairs.parquet")
        ties = 6 - len(pd.read_parquet(run_dir / f"round_{r:02d}" / "candidate_pairs.parquet"))
        row = f"| {r} | {gens['n_tokens'].mean():.1f} | {ties / 6:.0%} | {(pairs['margin_implicit'] > 0).mean():.0%} |"
        assert row in report, row
    for r in range(2):
        rdir = run_dir / f"round_{r:02d}"
        assert f"(round_{r:02d}/card.md)" in report
        card = (rdir / "card.md").read_text()
        # three example headings (a random policy's response text may itself hold "#### ", indented)
        assert len(re.findall(r"^#### (highest|median|lowest):", card, flags=re.M)) == 3 and "## Example pairs" in card
        for png in ("card_rewards.png", "card_margins_scatter.png", "card_margin_hist.png", "card_length_bias.png"):
            assert (rdir / png).stat().st_size > 2000 and png in card
        numbers = json.loads((rdir / "card.json").read_text())
        # recomputed here, independently of selfplay.reports.card
        scores = pd.read_parquet(rdir / "scores")
        pairs = pd.read_parquet(rdir / "pairs.parquet")
        kept_ids = set(pd.read_parquet(rdir / "selected.parquet")["prompt_id"])
        kept = pairs[pairs["prompt_id"].isin(kept_ids)]
        dropped = pairs[~pairs["prompt_id"].isin(kept_ids)]
        assert numbers["samples"] == len(scores) and numbers["prompts"] == scores["prompt_id"].nunique()
        assert numbers["all_tie_prompts"] == int((scores.groupby("prompt_id")["reward"].nunique() == 1).sum())
        assert (numbers["pairs"], numbers["kept"], numbers["dropped"]) == (len(pairs), len(kept), len(dropped))
        assert numbers["mean_reward"] == pytest.approx(scores["reward"].mean())
        assert numbers["mean_margin_explicit_kept"] == pytest.approx(kept["margin_explicit"].mean())
        assert numbers["mean_abs_margin_implicit_kept"] == pytest.approx(kept["margin_implicit"].abs().mean())
        assert numbers["mean_tokens_chosen"] == pytest.approx(pairs["n_tokens_chosen"].mean())
        corr = scores["reward"].corr(scores["n_tokens"])  # NaN when a column is constant; the card says None
        assert numbers["reward_length_correlation"] == (None if np.isnan(corr) else pytest.approx(corr))
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for r in range(2):
        (copy / f"round_{r:02d}" / "card.json").unlink()
    proc = run_cli("report", str(copy))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for r in range(2):
        name = f"round_{r:02d}/card.json"
        assert (copy / name).read_text() == (run_dir / name).read_text()
