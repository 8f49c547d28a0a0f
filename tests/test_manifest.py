"""Manifests: a stage is skipped when complete, refused when its config changed, redone when forced or stale,
and its outputs appear only complete."""

import json

import pytest

from selfplay.rundir import manifest as mf


def commit(round_dir, stage="score", config=None, inputs=None, content="x"):
    with mf.StageWriter(round_dir, stage, ["out.txt"]) as w:
        (w.tmp / "out.txt").write_text(content)
        return w.commit(config or {"reward.backend": "function"}, inputs or {"round_00/generate": "abc"}, {"rows": 1})


def test_complete_stage_is_skipped(tmp_path):
    rdir = tmp_path / "round_00"
    m = commit(rdir)
    assert (rdir / "out.txt").read_text() == "x"
    assert m["outputs"]["out.txt"]["sha256"] == mf.sha256_file(rdir / "out.txt")
    d = mf.decide(rdir, "score", {"reward.backend": "function"}, {"round_00/generate": "abc"}, force=False)
    assert not d.run and d.reason == "complete"


def test_changed_config_is_refused_naming_keys(tmp_path):
    rdir = tmp_path / "round_00"
    commit(rdir, config={"reward": {"backend": "function", "batch_size": 16}})
    with pytest.raises(mf.StageConfigChanged) as err:
        mf.decide(rdir, "score", {"reward": {"backend": "function", "batch_size": 32}}, {"round_00/generate": "abc"}, False)
    assert "reward.batch_size: 16 -> 32" in str(err.value)
    assert "force=[score]" in str(err.value)
    assert mf.decide(rdir, "score", {"reward": {"backend": "function", "batch_size": 32}}, {}, force=True).run


def test_changed_inputs_or_damaged_outputs_rerun(tmp_path):
    rdir = tmp_path / "round_00"
    commit(rdir)
    assert mf.decide(rdir, "score", {"reward.backend": "function"}, {"round_00/generate": "NEW"}, False).run
    (rdir / "out.txt").write_text("truncated and longer")
    assert mf.decide(rdir, "score", {"reward.backend": "function"}, {"round_00/generate": "abc"}, False).run


def test_failed_stage_leaves_no_output_and_no_manifest(tmp_path):
    rdir = tmp_path / "round_00"
    with pytest.raises(RuntimeError), mf.StageWriter(rdir, "score", ["out.txt"]) as w:
        (w.tmp / "out.txt").write_text("half")
        raise RuntimeError("killed")
    assert not (rdir / "out.txt").exists()
    assert mf.read_manifest(rdir, "score") is None
    assert not (rdir / ".tmp-score").exists()


def test_redo_replaces_outputs_and_manifest_last(tmp_path):
    rdir = tmp_path / "round_00"
    commit(rdir, content="old")
    m = commit(rdir, content="new")
    assert (rdir / "out.txt").read_text() == "new"
    assert json.loads((rdir / "score.done.json").read_text())["fingerprint"] == m["fingerprint"]


def test_stale_temp_dir_from_a_killed_attempt_is_discarded(tmp_path):
    rdir = tmp_path / "round_00"
    (rdir / ".tmp-score").mkdir(parents=True)
    (rdir / ".tmp-score" / "out.txt").write_text("partial")
    commit(rdir, content="full")
    assert (rdir / "out.txt").read_text() == "full"


def test_a_key_absent_from_an_older_manifest_equals_its_default_and_nothing_else():
    """Upgrade rule: a manifest written before an option existed resumes when the option is at its schema default;
    set to anything else, the stage is refused. A new option needs no entry anywhere for this."""
    from dataclasses import dataclass, field

    from selfplay.config import Config, TrainerConfig, option
    from selfplay.rundir.manifest import diff_config

    @dataclass
    class TrainerWithKnob(TrainerConfig):
        new_knob: int = option(3, ge=1)

    @dataclass
    class ConfigWithKnob(Config):
        trainer: TrainerWithKnob = field(default_factory=TrainerWithKnob)

    old = {"trainer": {"beta": 0.1}}
    assert diff_config(old, {"trainer": {"beta": 0.1, "new_knob": 3}}, schema=ConfigWithKnob) == []
    assert diff_config(old, {"trainer": {"beta": 0.1, "new_knob": 5}}, schema=ConfigWithKnob) == [
        "trainer.new_knob: 3 -> 5"]
    # options added since runs began, at their defaults, do not refuse a resume either
    assert diff_config({"prompts": {"per_round": 48}}, {"prompts": {"per_round": 48, "word_budget": None,
                                                                    "eval_only_families": []}}) == []
    # the migration table: in a schema-1 manifest an absent `precision` means fp32, what every run did then
    assert diff_config({}, {"precision": "fp32"}, recorded_schema=1) == []
    assert diff_config({}, {"precision": "bf16"}, recorded_schema=1) != []
