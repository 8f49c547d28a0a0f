"""A train stage must train: the warm-up never turns a round's only steps into no-ops, and a round whose steps changed
no weight fails (its bad-input row is `train_changed_nothing` in test_bad_inputs.py)."""

from __future__ import annotations

import json

from conftest import run_cli, tiny_overrides
from hydra import compose, initialize_config_dir

from selfplay.config import conf_dir, register
from selfplay.stages.train import changed_tensor, optimizer_steps, warmup_steps


def _cfg(*overrides):
    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_warmup_is_whole_steps_rounded_down_and_never_all_of_them():
    cfg = _cfg("trainer.warmup_ratio=0.1", "trainer.batch_size=4", "trainer.epochs=1")
    # transformers would round 10% of 1–9 steps up to one step at learning rate 0: here it is none
    assert [warmup_steps(cfg, 4 * steps) for steps in range(1, 10)] == [0] * 9
    assert warmup_steps(cfg, 4 * 10) == 1 and warmup_steps(cfg, 4 * 25) == 2
    steep = _cfg("trainer.warmup_ratio=0.9", "trainer.batch_size=4", "trainer.epochs=1")
    assert [warmup_steps(steep, 4 * steps) for steps in (1, 2, 3)] == [0, 1, 2]  # the last step always trains
    accumulated = _cfg("trainer.batch_size=2", "trainer.gradient_accumulation_steps=3", "trainer.epochs=2")
    assert optimizer_steps(accumulated, 13) == 2 * 3  # 7 micro-batches → 3 optimizer steps, twice
    assert optimizer_steps(accumulated, 13, world_size=2) == 2 * 2


def test_a_one_step_round_changes_the_policy(tmp_path, tiny_policy):
    overrides = tiny_overrides(tmp_path, tiny_policy, None, run_name="one_step")
    # 4 prompts → at most 4 pairs, all kept, one batch of 4, one epoch, a 10% warm-up: exactly one optimizer step.
    proc = run_cli("stage", "prompts,generate,score,pair,margin,select,train", "round=0", *overrides,
                   "prompts.per_round=4", "selection=all", "trainer.batch_size=4", "trainer.epochs=1",
                   "trainer.warmup_ratio=0.1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rdir = tmp_path / "one_step" / "round_00"
    stats = json.loads((rdir / "train.done.json").read_text())["stats"]
    assert stats["steps"] == 1 and stats["first_changed_tensor"]
    assert changed_tensor(tiny_policy, rdir / "policy") is not None
