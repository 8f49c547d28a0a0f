"""Experiment tracking: `logger=tensorboard` writes event files that TensorBoard's own reader loads with the
per-round scalars (step = round, values = the manifests') and the trainer's own metrics; a re-run adds nothing;
logging does not change training; a missing package is one clear line."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pandas as pd
import pytest
from conftest import run_cli, tiny_overrides

from selfplay.config import STAGES, ConfigError, register, validate
from selfplay.reports.tracking import TrackerUnavailable, open_tracker, round_metrics

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in a directory's event files as TensorBoard loads it: (step, value) in file order."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def composed(*overrides):
    from hydra import compose, initialize_config_dir

    from selfplay.config import conf_dir

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_logger_is_validated_naming_the_option():
    assert composed().logger == "none"
    validate(composed("logger=tensorboard"))
    with pytest.raises(ConfigError, match=r"^logger: must be one of .*'tensorboard'.*got 'tensorbord'$"):
        validate(composed("logger=tensorbord"))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_one_clear_line(tmp_path):
    with pytest.raises(TrackerUnavailable, match=r"logger=wandb needs the `wandb` package: pip install wandb"):
        open_tracker(composed("logger=wandb"), tmp_path)


def test_a_round_logged_again_replaces_its_points_and_the_later_ones(tmp_path):
    cfg = composed("logger=tensorboard")
    with open_tracker(cfg, tmp_path) as tracker:
        assert tracker.log_round(0, {"eval/mean_reward": 0.25}) and tracker.log_round(1, {"eval/mean_reward": 0.5})
    files = sorted((tmp_path / "tensorboard").glob("events.*"))
    with open_tracker(cfg, tmp_path) as tracker:  # a finished re-run: nothing written, no new file
        assert not tracker.log_round(0, {"eval/mean_reward": 0.25})
        assert not tracker.log_round(1, {"eval/mean_reward": 0.5})
    assert sorted((tmp_path / "tensorboard").glob("events.*")) == files
    with open_tracker(cfg, tmp_path) as tracker:  # round 0 redone: its new values replace round 0 and round 1
        assert tracker.log_round(0, {"eval/mean_reward": 0.125})
    assert scalars(tmp_path / "tensorboard") == {"eval/mean_reward": [(0, 0.125)]}
    with open_tracker(cfg, tmp_path) as tracker:
        assert tracker.log_round(1, {"eval/mean_reward": 0.75})
    assert scalars(tmp_path / "tensorboard") == {"eval/mean_reward": [(0, 0.125), (1, 0.75)]}


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory, tiny_policy):
    out = tmp_path_factory.mktemp("tracked")
    overrides = [*tiny_overrides(out, tiny_policy, None, run_name="tb"), "logger=tensorboard"]
    proc = run_cli("run", *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "tb", overrides


def manifests(run_dir, r):
    return {stage: json.loads((run_dir / f"round_{r:02d}" / f"{stage}.done.json").read_text()) for stage in STAGES}


@pytest.mark.slow
def test_tensorboard_reader_loads_the_per_round_scalars_of_the_manifests(tb_run):
    run_dir, _ = tb_run
    logged = scalars(run_dir / "tensorboard")
    expected = [round_metrics(manifests(run_dir, r)) for r in range(2)]
    for tag in ("eval/mean_reward", "eval/win_rate_vs_base", "score/mean_reward", "select/pairs",
                "margin/mean_margin_implicit", "train/final_loss", "time/generate_s", "time/train_s"):
        assert tag in expected[0]
    assert set(logged) == set(expected[0])
    for tag, points in logged.items():
        assert [step for step, _ in points] == [0, 1], tag
        assert [value for _, value in points] == pytest.approx([e[tag] for e in expected], rel=1e-6), tag
    # straight from the files too: eval.json's held-out reward, select's kept pairs
    for r in range(2):
        rdir = run_dir / f"round_{r:02d}"
        assert logged["eval/mean_reward"][r][1] == pytest.approx(json.loads((rdir / "eval.json").read_text())
                                                                 ["mean_reward"], abs=1e-4)
        assert logged["select/pairs"][r][1] == len(pd.read_parquet(rdir / "selected.parquet"))


@pytest.mark.slow
def test_trainer_metrics_arrive_through_report_to(tb_run):
    run_dir, _ = tb_run
    for r in range(2):
        train = manifests(run_dir, r)["train"]["stats"]
        logged = scalars(run_dir / "tensorboard" / f"round_{r:02d}_train")
        assert {"train/loss", "train/learning_rate", "train/rewards/margins"} <= set(logged)
        assert [step for step, _ in logged["train/loss"]] == list(range(1, train["steps"] + 1))
        assert logged["train/loss"][-1][1] == pytest.approx(train["final_loss"], abs=1e-4)


@pytest.mark.slow
def test_rerun_of_a_finished_run_adds_no_events(tb_run):
    run_dir, overrides = tb_run
    before = {p: p.stat().st_size for p in (run_dir / "tensorboard").rglob("*") if p.is_file()}
    proc = run_cli("run", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_size for p in (run_dir / "tensorboard").rglob("*") if p.is_file()} == before
    assert [step for step, _ in scalars(run_dir / "tensorboard")["eval/mean_reward"]] == [0, 1]


@pytest.mark.slow
def test_logging_does_not_change_training(tb_run, tmp_path):
    run_dir, overrides = tb_run
    shutil.copytree(run_dir, tmp_path / "tb")
    base = [o for o in overrides if not o.startswith(("output_root=", "logger="))] + [f"output_root={tmp_path}"]
    proc = run_cli("stage", "train", "round=0", *base, "logger=none", "force=[train]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged, plain = (json.loads((d / "round_00" / "train.done.json").read_text()) for d in (run_dir, tmp_path / "tb"))
    assert plain["timings"]["finished"] > logged["timings"]["finished"]  # trained again
    assert plain["outputs"]["policy/model.safetensors"] == logged["outputs"]["policy/model.safetensors"]
