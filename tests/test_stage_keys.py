"""A stage's declared config keys (its CONFIG, recorded in its manifest) are its cache key: a key a stage reads but
does not declare would let a changed option reuse a stale output without a word. These tests make that impossible
to miss:

* every option of the composed config is declared by some stage, or listed in `NOT_CACHE_KEYS` with the reason
  (selfplay/stages/base.py): a new option must say which;
* a change of any option, against a finished run, is refused by exactly the finished stages that declare it (the
  stages downstream of them then re-run through their inputs' fingerprints);
* a real run, with every config read recorded while a stage runs, proves no stage reads a key outside what it
  declares, what it lists as read without changing its result (UNKEYED), what the stages it reads from declare
  (their changes reach it through their outputs' fingerprints) and `NOT_CACHE_KEYS`; the recorder is shown to catch a stage that reads a key it does not declare.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import tiny_overrides
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.nodes import ValueNode

from selfplay.config import STAGES
from selfplay.rundir import manifest as mf
from selfplay.runner import pipeline
from selfplay.runner.slurm import compose
from selfplay.stages.base import (
    NOT_CACHE_KEYS,
    RESULT_NEUTRAL,
    config_view,
    stage_config_keys,
    stage_module,
    stage_unkeyed_reads,
    upstream_stages,
)


def covered(key: str, declared) -> bool:
    """`key` is one of `declared` or inside one of them (`trainer.beta` inside `trainer`)."""
    return any(key == d or key.startswith(f"{d}.") for d in declared)


def leaves(cfg: DictConfig) -> dict[str, object]:
    return mf.flatten(OmegaConf.to_container(cfg, resolve=True))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_policy):
    return compose(tiny_overrides(tmp_path_factory.mktemp("keys"), tiny_policy, None, "keys"))


def test_every_option_is_declared_by_a_stage_or_listed_as_not_changing_results(cfg):
    declared = {k for s in STAGES for k in stage_config_keys(stage_module(s), cfg)}
    stray = [k for k in leaves(cfg) if not covered(k, declared) and not covered(k, tuple(NOT_CACHE_KEYS))]
    assert not stray, f"options no stage declares and not in NOT_CACHE_KEYS: {stray}"
    neutral_but_declared = [k for k in tuple(NOT_CACHE_KEYS) if covered(k, declared)]
    assert not neutral_but_declared, f"declared by a stage and listed as not changing results: {neutral_but_declared}"


# --- what stages really read -------------------------------------------------------------------------------------


class ConfigReads:
    """Records, per stage, the dotted key of every value read from one config while that stage's code runs: a
    wrapper around OmegaConf's node lookup (every attribute, item, select and to_container read goes through it)."""

    def __init__(self, root: DictConfig, monkeypatch):
        self.root, self.stage, self.reads, self.busy = root, None, defaultdict(set), False
        for cls in (DictConfig, ListConfig):
            monkeypatch.setattr(cls, "_get_node", self._recording(cls._get_node))

    def _recording(self, lookup):
        def get_node(node, key, *args, **kwargs):
            found = lookup(node, key, *args, **kwargs)
            if self.stage is not None and not self.busy and isinstance(found, (ValueNode, ListConfig)):
                self.busy = True  # the root and the full key are looked up through _get_node too
                try:
                    if node._get_root() is self.root:
                        self.reads[self.stage].add(re.sub(r"\[\d+\]$", "", node._get_full_key(key)))
                finally:
                    self.busy = False
            return found
        return get_node

    def watch(self, monkeypatch, stage: str) -> None:
        """Record while the stage's entry points (run, or compute and merge) run."""
        module = stage_module(stage)
        for name in ("run", "compute", "merge"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, self._during(stage, getattr(module, name)))

    def _during(self, stage, entry):
        def entry_point(*args, **kwargs):
            with self._as(stage):
                result = entry(*args, **kwargs)
            return self._iterating(stage, result) if inspect.isgenerator(result) else result
        return entry_point

    def _iterating(self, stage, rows):
        """A sharded stage's compute yields its windows lazily: its body runs while the runner iterates."""
        while True:
            with self._as(stage):
                try:
                    item = next(rows)
                except StopIteration:
                    return
            yield item

    @contextlib.contextmanager
    def _as(self, stage):
        self.stage = stage
        try:
            yield
        finally:
            self.stage = None


def undeclared_reads(cfg, reads: dict[str, set[str]], rounds: int) -> list[str]:
    found = []
    for stage, keys in sorted(reads.items()):
        module = stage_module(stage)
        allowed = set(stage_config_keys(module, cfg)) | set(stage_unkeyed_reads(module)) | set(NOT_CACHE_KEYS)
        for r in range(rounds):
            allowed |= {k for _, up in upstream_stages(stage, r, cfg) for k in stage_config_keys(stage_module(up), cfg)}
        found += [f"{stage} reads {k}" for k in sorted(keys) if not covered(k, allowed)]
    return found


def recorded_run(tmp_path: Path, overrides: list[str], monkeypatch, rounds: int) -> tuple[DictConfig, dict]:
    cfg = compose(overrides)
    OmegaConf.set_readonly(cfg, True)
    recorder = ConfigReads(cfg, monkeypatch)
    for stage in STAGES:
        recorder.watch(monkeypatch, stage)
    for r in range(rounds):
        for stage in STAGES:
            pipeline.run_stage(cfg, tmp_path / "run", stage, r)
    return cfg, recorder.reads


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, tiny_policy):
    """A 2-round tiny run (DPO, a reward function, MAP) made in this process with every stage's reads recorded."""
    tmp = tmp_path_factory.mktemp("recorded")
    with pytest.MonkeyPatch.context() as monkeypatch:
        cfg, reads = recorded_run(tmp, tiny_overrides(tmp, tiny_policy, None, "run"), monkeypatch, 2)
    return cfg, reads, tmp / "run"


def test_no_stage_reads_a_key_it_does_not_declare(default_run):
    cfg, reads, _ = default_run
    assert set(reads) == set(STAGES)  # the recorder saw every stage run
    assert {"sampler.n", "trainer.beta", "selection.metric"} <= set().union(*reads.values())
    assert not undeclared_reads(cfg, reads, 2)


def test_nor_with_a_classifier_reward_mmpo_real_and_drift(tmp_path, tiny_policy, tiny_reward_model, monkeypatch):
    overrides = [*tiny_overrides(tmp_path, tiny_policy, tiny_reward_model, "run"), "trainer=mmpo", "selection=real",
                 "eval.drift=true", "rounds=1"]
    cfg, reads = recorded_run(tmp_path, overrides, monkeypatch, 1)
    assert {"reward.model", "trainer.gamma", "selection.real_encoder"} <= set().union(*reads.values())
    assert not undeclared_reads(cfg, reads, 1)


def test_the_recorder_catches_a_stage_reading_a_key_it_does_not_declare(tmp_path, tiny_policy, monkeypatch):
    """The pair stage made to read trainer.beta (declared by margin and train, which pair does not read)."""
    pair = stage_module("pair")
    real_run = pair.run

    def run_reading_beta(ctx):
        ctx.stats["beta_seen"] = float(ctx.cfg.trainer.beta)
        return real_run(ctx)

    monkeypatch.setattr(pair, "run", run_reading_beta)
    cfg, reads = recorded_run(tmp_path, [*tiny_overrides(tmp_path, tiny_policy, None, "run"), "rounds=1"],
                              monkeypatch, 1)
    assert undeclared_reads(cfg, reads, 1) == ["pair reads trainer.beta"]


def perturbed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, list):
        return [*value, "changed"]
    return "changed"  # None


def test_a_changed_option_invalidates_exactly_the_finished_stages_that_declare_it(default_run):
    """Every option in turn, changed, against the finished run's manifests: the stages that refuse (a finished
    stage with another config) are exactly those whose declared keys hold it; none other notices. (Their
    dependants then re-run through their inputs' fingerprints, test_pipeline_e2e.py.)"""
    cfg, _, run_dir = default_run
    for key, value in leaves(cfg).items():
        if covered(key, tuple(NOT_CACHE_KEYS)):
            continue
        changed = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        OmegaConf.update(changed, key, perturbed(value), merge=False)
        refused = set()
        for r in range(2):
            for stage in STAGES:
                manifest = mf.read_manifest(run_dir / f"round_{r:02d}", stage)
                try:
                    mf.decide(run_dir / f"round_{r:02d}", stage, config_view(changed, stage_config_keys(
                        stage_module(stage), changed)), manifest["inputs"], force=False)
                except mf.StageConfigChanged:
                    refused.add((r, stage))
        declaring = {(r, s) for r in range(2) for s in STAGES if covered(key, stage_config_keys(stage_module(s), cfg))
                     and not covered(key, RESULT_NEUTRAL)}
        assert refused == declaring, key
