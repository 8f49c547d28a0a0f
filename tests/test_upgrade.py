"""Run directories survive upgrades: a committed run made by older code resumes, renamed keys and keys that did not
exist yet read as they meant then, and an option whose default changed keeps an old run on its old value."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import TESTS, run_cli
from omegaconf import OmegaConf

from selfplay.config import REMOVED_OPTIONS, STAGES
from selfplay.rundir import manifest as mf
from selfplay.runner.upgrade import pin_old_behaviour

sys.path.insert(0, str(TESTS / "fixtures"))
from make_upgrade_fixture import FIXTURE, overrides  # noqa: E402
from test_precision import composed  # noqa: E402  (the Hydra config as `selfplay run` composes it)


def test_the_committed_old_run_directory_resumes_and_goes_on(tmp_path):
    """The fixture (tests/fixtures/make_upgrade_fixture.py) was made by an earlier selfplay. Resumed by today's code
    with one more round, round 0 must be taken whole (no refusal, no redo) and round 1 must run on top of it."""
    root = tmp_path / "fixture"
    shutil.copytree(FIXTURE, root)
    done = run_cli("run", *[o for o in overrides(root) if o != "rounds=1"], "rounds=2")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    for stage in STAGES:
        assert f"round 0 {stage:<8} skipped (complete)" in log, f"round 0 {stage} was not taken as complete:\n{log}"
        assert f"round 1 {stage:<8} done in" in log, stage
    assert "already finished with a different config" not in log
    assert json.loads((root / "run" / "round_01" / "train.done.json").read_text())["config_schema"] == mf.CONFIG_SCHEMA


def test_the_migration_table_names_real_options():
    assert max(m.since for m in mf.MIGRATIONS) <= mf.CONFIG_SCHEMA
    for m in mf.MIGRATIONS:
        if m.removed:  # gone, and the command line says what replaced it
            assert mf.schema_default(m.key) is mf.MISSING, f"{m.key} is still an option"
            assert m.key in REMOVED_OPTIONS, f"{m.key}: no entry in config.REMOVED_OPTIONS"
        else:
            assert mf.schema_default(m.key) is not mf.MISSING, f"{m.key} is not an option today"
    assert set(REMOVED_OPTIONS) == {m.key for m in mf.MIGRATIONS if m.removed}


def test_a_removed_option_in_an_older_manifest_is_dropped_when_it_asked_for_what_runs_today():
    gone = [mf.Migration(since=3, key="trainer.bf16", removed=True, before=False),
            mf.Migration(since=3, key="margin.beta", removed=True)]
    today = {"margin": {"batch_size": 8}, "trainer": {"beta": 0.1}}
    old = {"margin": {"beta": 0.7, "batch_size": 8}, "trainer": {"bf16": False, "beta": 0.1}}
    assert mf.diff_config(old, today, recorded_schema=2, migrations=gone) == []
    # a value today's code cannot do any more is a change, named, so the finished stage is refused
    old["trainer"]["bf16"] = True
    assert mf.diff_config(old, today, recorded_schema=2, migrations=gone) == ["trainer.bf16: True -> '<absent>'"]
    # a manifest written after the removal is read as it is
    assert mf.diff_config(old, today, recorded_schema=3, migrations=gone) != []
    # the refusal says what replaced a removed option
    with pytest.raises(mf.StageConfigChanged, match=r"margin.beta: 0.7 -> '<absent>'   \(removed: .*trainer.beta"):
        mf.refuse_changed("round_00/margin already finished", ["margin.beta: 0.7 -> '<absent>'"], "Re-run.")


def test_a_renamed_key_in_an_older_manifest_reads_under_its_new_name():
    renamed = [mf.Migration(since=2, key="trainer.beta", renamed_from="trainer.kl_beta")]
    old = {"trainer": {"kl_beta": 0.1}}
    assert mf.diff_config(old, {"trainer": {"beta": 0.1}}, recorded_schema=1, migrations=renamed) == []
    assert mf.diff_config(old, {"trainer": {"beta": 0.3}}, recorded_schema=1, migrations=renamed) == [
        "trainer.beta: 0.1 -> 0.3"]
    # a manifest written after the rename is read as it is
    assert mf.diff_config(old, {"trainer": {"beta": 0.1}}, recorded_schema=2, migrations=renamed) != []


def _finished_train(run_dir: Path, config: dict, schema: int) -> None:
    rdir = run_dir / "round_00"
    rdir.mkdir(parents=True)
    manifest = {"stage": "train", "round": 0, "config": config, "inputs": {}, "outputs": {}}
    if schema > 1:
        manifest["config_schema"] = schema
    (rdir / "train.done.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("schema", "command_line", "pinned"), [(1, [], True), (1, ["trainer.beta"], False),
                                                                (2, [], False)])
def test_an_option_whose_default_changed_keeps_an_old_run_on_its_old_value(tmp_path, schema, command_line, pinned):
    """Say trainer.beta's default went from 0.2 to today's 0.1 in schema 2: a run whose train stage finished at
    0.2 under schema 1 resumes at 0.2 unless the command line sets beta; a newer run is left alone."""
    changed = [mf.Migration(since=2, key="trainer.beta", before=0.2)]
    _finished_train(tmp_path, {"trainer.beta": 0.2}, schema)
    cfg = composed()
    assert cfg.trainer.beta == mf.schema_default("trainer.beta") == 0.1
    pins = pin_old_behaviour(cfg, tmp_path, command_line, migrations=changed)
    assert (pins == ["trainer.beta=0.2"]) is pinned
    assert cfg.trainer.beta == (0.2 if pinned else 0.1)


def test_an_option_set_away_from_its_default_is_not_pinned(tmp_path):
    changed = [mf.Migration(since=2, key="trainer.beta", before=0.2)]
    _finished_train(tmp_path, {"trainer.beta": 0.2}, schema=1)
    cfg = composed("trainer.beta=0.5")  # e.g. from an experiment preset
    assert pin_old_behaviour(cfg, tmp_path, [], migrations=changed) == []
    assert OmegaConf.select(cfg, "trainer.beta") == 0.5


def test_a_run_made_before_precision_existed_resumes_in_fp32(tmp_path):
    """The real entry of the table: schema-1 manifests without `precision` ran fp32, so the run stays fp32."""
    _finished_train(tmp_path, {"trainer.beta": 0.1}, schema=1)
    cfg = composed()
    assert pin_old_behaviour(cfg, tmp_path, []) == ["precision='fp32'"]
    assert cfg.precision == "fp32"
