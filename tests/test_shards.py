"""Sharded stages (what SLURM array tasks run): any shard count gives the single-process result, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli, tiny_overrides
from safetensors.torch import load_file

from selfplay.errors import SelfplayError
from selfplay.rundir import manifest as mf
from selfplay.rundir import shards
from selfplay.rundir.shards import read_shard_manifests, shard_span
from selfplay.runner import pipeline
from selfplay.runner.slurm import compose


def test_shard_span_covers_every_unit_once_on_unit_boundaries():
    for n_items in (0, 1, 7, 16, 17, 100):
        for unit in (1, 4, 16):
            for num_shards in (1, 2, 3, 8):
                spans = [shard_span(n_items, unit, i, num_shards) for i in range(num_shards)]
                covered = [j for lo, hi in spans for j in range(lo, hi)]
                assert covered == list(range(n_items))
                assert all(lo % unit == 0 for lo, _ in spans)


def frames(run_dir: Path, r: int = 0) -> dict[str, pd.DataFrame]:
    rdir = run_dir / f"round_{r:02d}"
    read = lambda p: pd.concat([pd.read_parquet(f) for f in sorted(p.glob("part-*.parquet"))], ignore_index=True)  # noqa: E731
    return {"generations": read(rdir / "generations"), "scores": read(rdir / "scores"),
            "pairs": pd.read_parquet(rdir / "pairs.parquet"), "selected": pd.read_parquet(rdir / "selected.parquet")}


@pytest.mark.parametrize("reward", ["hf_classifier", "function"])
def test_sharded_stages_equal_the_single_process_run(tmp_path, tiny_policy, tiny_reward_model, reward):
    rm = tiny_reward_model if reward == "hf_classifier" else None
    # Small batches so that every stage has several units of work to split: 12 prompts in 6 generate windows of 2;
    # windows of 8 rows, so score, pair, margin and select stream several windows and shards take some each.
    extra = ["rounds=1", "prompts.per_round=12", "sampler.batch_size=1", "sampler.sort_window_batches=2",
             "reward.batch_size=4", "margin.batch_size=4", "window_rows=8"]
    local = run_cli("run", *tiny_overrides(tmp_path, tiny_policy, rm, "local"), *extra)
    assert local.returncode == 0, local.stderr[-3000:]

    overrides = [*tiny_overrides(tmp_path, tiny_policy, rm, "sharded"), *extra]
    run_dir = tmp_path / "sharded"
    cfg = compose(overrides)

    def stage(name: str, shard: int | None = None, num_shards: int | None = None) -> dict:
        return pipeline.run_stage(cfg, run_dir, name, 0, set(), shard, num_shards)

    stage("prompts")
    # One shard through the real command line (what an array task runs), the rest in this process.
    shard_cli = run_cli("stage", "generate", "round=0", *overrides, "shard=1", "num_shards=3")
    assert shard_cli.returncode == 0, shard_cli.stderr[-3000:]
    for i in (0, 2, 1):  # out of order, and shard 1 again (already on disk: skipped)
        stage("generate", i, 3)
    assert sorted(read_shard_manifests(run_dir / "round_00", "generate")[3]) == [0, 1, 2]
    merged = stage("generate")
    assert merged["stats"]["shards"] == 3 and merged["stats"]["responses"] == 12 * 3
    assert len(list((run_dir / "round_00" / "generations").glob("part-*.parquet"))) == 3
    stage("score", 0, 2)  # shard 1 of 2 is never run as a shard: the merge computes it in-process
    assert stage("score")["stats"]["shards"] == 2
    stage("pair")
    for i in range(7):  # more shards than margin batches: some shards are empty
        stage("margin", i, 7)
    assert stage("margin")["stats"]["shards"] == 7
    for name in ("select", "train", "eval"):
        stage(name)

    ours, theirs = frames(run_dir), frames(tmp_path / "local")
    for name in ours:
        pd.testing.assert_frame_equal(ours[name], theirs[name], check_exact=True, obj=name)
    weights = load_file(run_dir / "round_00" / "policy" / "model.safetensors")
    reference = load_file(tmp_path / "local" / "round_00" / "policy" / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert all((weights[k] == reference[k]).all() for k in weights)


def test_shards_refuse_a_second_shard_count_and_a_changed_config(tmp_path, tiny_policy):
    overrides = [*tiny_overrides(tmp_path, tiny_policy, None, "mixed"), "rounds=1", "sampler.batch_size=2"]
    run_dir = tmp_path / "mixed"
    cfg = compose(overrides)
    pipeline.run_stage(cfg, run_dir, "prompts", 0)
    pipeline.run_stage(cfg, run_dir, "generate", 0, set(), 0, 2)
    other = run_cli("stage", "generate", "round=0", *overrides, "shard=0", "num_shards=3")
    assert other.returncode == 2
    assert "already has shards of num_shards=2" in other.stderr and "Traceback" not in other.stderr
    changed = run_cli("stage", "generate", "round=0", *overrides, "sampler.temperature=0.5", "shard=0", "num_shards=2")
    assert changed.returncode == 2 and "sampler.temperature: 0.8 -> 0.5" in changed.stderr
    bad = run_cli("stage", "pair", "round=0", *overrides, "shard=0", "num_shards=2")
    assert bad.returncode == 2 and "apply to one of generate, score, margin" in bad.stderr
    half = run_cli("stage", "generate", "round=0", *overrides, "shard=2", "num_shards=2")
    assert half.returncode == 2 and "shard: must be in [0, num_shards=2)" in half.stderr
    # The untouched shard 0 is still the one on disk, its manifest unchanged.
    assert mf.read_json(run_dir / "round_00" / "shards" / "generate" / "part-00000-of-00002.done.json")["shard"] == 0


def rewrite_part(round_dir: Path, stage: str, shard: int, num_shards: int, frame: pd.DataFrame) -> None:
    """Replace a shard's part and restamp its manifest: a part that passes every file check but whose rows are not
    the stage's (as if copied in from another run)."""
    part = shards.part_path(round_dir, stage, shard, num_shards)
    frame.to_parquet(part, index=False)
    done = part.with_name(part.name.replace(".parquet", ".done.json"))
    manifest = mf.read_json(done)
    manifest["outputs"] = mf.checksum_outputs(part.parent, [part.name])
    done.write_text(json.dumps(manifest))


def test_a_shard_part_that_does_not_line_up_with_its_input_is_refused(tmp_path, tiny_policy):
    # The merges check the parts row for row (score: each row's prompt_id and sample_idx; margin: every response
    # once), on arrow columns rather than a Python object per row.
    overrides = [*tiny_overrides(tmp_path, tiny_policy, None, "tampered"), "rounds=1", "window_rows=4"]
    run_dir = tmp_path / "tampered"
    rdir = run_dir / "round_00"
    cfg = compose(overrides)
    for name in ("prompts", "generate"):
        pipeline.run_stage(cfg, run_dir, name, 0)
    for i in range(2):
        pipeline.run_stage(cfg, run_dir, "score", 0, set(), i, 2)
    scores = pd.read_parquet(shards.part_path(rdir, "score", 1, 2))
    scores.loc[len(scores) - 1, "prompt_id"] = "a-prompt-of-another-round"
    rewrite_part(rdir, "score", 1, 2, scores)
    with pytest.raises(SelfplayError, match="score: the shard parts do not cover"):
        pipeline.run_stage(cfg, run_dir, "score", 0)
    assert not (rdir / "scores").exists()

    shards.remove_shards(rdir, "score")
    for name in ("score", "pair"):
        pipeline.run_stage(cfg, run_dir, name, 0)
    for i in range(2):
        pipeline.run_stage(cfg, run_dir, "margin", 0, set(), i, 2)
    margins = pd.read_parquet(shards.part_path(rdir, "margin", 0, 2))
    rewrite_part(rdir, "margin", 0, 2, margins.iloc[1:])  # one response missing
    with pytest.raises(SelfplayError, match="margin: the shard parts do not cover"):
        pipeline.run_stage(cfg, run_dir, "margin", 0)
    assert not (rdir / "pairs.parquet").exists()
