"""The self-play loop: for each round, run the stages in order; each stage is skipped when already complete.

    for round r in 0..rounds-1:
        prompts → generate → score → pair → margin → select → train → eval

Each stage lives in `selfplay/stages/<name>.py` with one entry point `run(ctx) -> stats`, plus three
declarations the runner reads: OUTPUTS (what it writes into the round directory), CONFIG (the config keys its
result depends on, recorded in its manifest) and `requires(round, cfg)` (the upstream stages whose outputs it reads).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from . import checkpoints, shards
from . import manifest as mf
from .config import STAGES
from .errors import SelfplayError

log = logging.getLogger("selfplay")


class StageInputMissing(SelfplayError):
    """An upstream stage this one reads from has not finished."""


def round_dir(run_dir: Path, r: int) -> Path:
    return run_dir / f"round_{r:02d}"


def stage_module(name: str) -> Any:
    return importlib.import_module(f"selfplay.stages.{name}")


def stage_outputs(module: Any, r: int) -> tuple[str, ...]:
    return tuple(module.OUTPUTS(r) if callable(module.OUTPUTS) else module.OUTPUTS)


def stage_config_keys(module: Any, cfg: DictConfig) -> tuple[str, ...]:
    """The config keys a stage's result depends on (CONFIG, or CONFIG(cfg) where they depend on its options)."""
    return tuple(module.CONFIG(cfg) if callable(module.CONFIG) else module.CONFIG)


# Options that change how a stage works but never its result: left out of manifests, so changing them (or a run
# begun before they existed) never refuses a resume.
RESULT_NEUTRAL = ("trainer.save_steps",)


def config_view(cfg: DictConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    """The listed (dotted) config keys, as plain values, for a stage's manifest."""
    view = {}
    for key in keys:
        value = OmegaConf.select(cfg, key)
        view[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
    for neutral in RESULT_NEUTRAL:
        group, _, name = neutral.rpartition(".")
        if isinstance(view.get(group), dict):
            view[group].pop(name, None)
    return view


@dataclass
class StageContext:
    """What a stage sees: the config, where it reads (round dirs) and where it writes (`out`)."""

    cfg: DictConfig
    run_dir: Path
    round: int
    out: Path
    stats: dict[str, Any] = field(default_factory=dict)
    # Where this attempt keeps checkpoints of a long stage (generate's windows, train's steps): kept across kills,
    # keyed by the stage's config and inputs (selfplay/checkpoints.py).
    checkpoint_dir: Path | None = None

    @property
    def round_dir(self) -> Path:
        return round_dir(self.run_dir, self.round)

    def path(self, name: str, r: int | None = None) -> Path:
        """An output of an upstream stage (in round r, default this round)."""
        return round_dir(self.run_dir, self.round if r is None else r) / name

    def read_parquet(self, name: str, r: int | None = None) -> pd.DataFrame:
        """A whole parquet output: a file, or a directory of part-*.parquet read in part order."""
        path = self.path(name, r)
        parts = sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    def policy_path(self, r: int | None = None) -> Path:
        """π_r: the configured base model for round 0, else the policy trained in round r-1."""
        r = self.round if r is None else r
        if r == 0:
            from .modeling import resolve_model_path

            return resolve_model_path(self.cfg.model.path)
        return round_dir(self.run_dir, r - 1) / "policy"

    @property
    def device(self) -> Any:
        from .modeling import torch_device

        return torch_device(self.cfg.device)


def _input_fingerprints(cfg: DictConfig, run_dir: Path, stage: str, r: int, verify: bool = False) -> dict[str, str]:
    """The fingerprints of the upstream manifests this stage reads; with verify, their files are checked first."""
    inputs: dict[str, str] = {}
    for up_round, up_stage in stage_module(stage).requires(r, cfg):
        manifest = mf.read_manifest(round_dir(run_dir, up_round), up_stage)
        if manifest is None:
            raise StageInputMissing(
                f"round_{r:02d}/{stage} needs round_{up_round:02d}/{up_stage}, which has not finished; "
                f"run `selfplay stage {up_stage} round={up_round}` (or `selfplay run`) first"
            )
        if verify:
            mf.verify_outputs(round_dir(run_dir, up_round), manifest, f"round_{up_round:02d}/{up_stage}.done.json")
        inputs[f"round_{up_round:02d}/{up_stage}"] = manifest["fingerprint"]
    if r == 0 and (stage in ("generate", "margin", "train", "eval") or (stage == "prompts" and cfg.prompts.evolve)):
        # The base policy is an input of round 0's stages that run it; later rounds inherit it through round 0.
        inputs["base_policy"] = _policy_fingerprint(cfg)
    return inputs


def _policy_fingerprint(cfg: DictConfig) -> str:
    from .modeling import resolve_model_path

    path = resolve_model_path(cfg.model.path)
    files = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
    return mf.fingerprint({"files": files, "config": (path / "config.json").read_text()})


def run_stage(cfg: DictConfig, run_dir: Path, stage: str, r: int, forced: set[str] = frozenset(),
              shard: int | None = None, num_shards: int | None = None) -> dict[str, Any]:
    """Run one stage of one round (or one shard of it) unless already complete; return its manifest."""
    module = stage_module(stage)
    rdir = round_dir(run_dir, r)
    config = config_view(cfg, stage_config_keys(module, cfg))
    inputs = _input_fingerprints(cfg, run_dir, stage, r)
    force = stage in forced or "all" in forced
    label = f"round {r} {stage:<8}" if shard is None else f"round {r} {stage} shard {shard}/{num_shards}"
    decision = mf.decide(rdir, stage, config, inputs, force=force)
    if not decision.run:
        log.info("%s skipped (%s)", label, decision.reason)
        if shard is None:  # a kill after the manifest was written can leave the attempt's scratch behind
            shutil.rmtree(rdir / f".tmp-{stage}", ignore_errors=True)
            checkpoints.clear(rdir, stage)
        return mf.read_manifest(rdir, stage)
    _input_fingerprints(cfg, run_dir, stage, r, verify=True)  # what it reads is what its manifests say
    save_config(cfg, run_dir)  # the config that produces what follows; a refused run never gets here
    if force:
        checkpoints.clear(rdir, stage)
    checkpoint_dir = checkpoints.attempt_dir(rdir, stage, config, inputs)
    if shard is not None:
        return _run_shard(module, StageContext(cfg=cfg, run_dir=run_dir, round=r, out=rdir,
                                               checkpoint_dir=checkpoint_dir), shard, num_shards,
                          config, inputs, force, label)
    log.info("%s running (%s)", label, decision.reason)
    with mf.StageWriter(rdir, stage, stage_outputs(module, r)) as writer:
        ctx = StageContext(cfg=cfg, run_dir=run_dir, round=r, out=writer.tmp, checkpoint_dir=checkpoint_dir)
        if stage in shards.SHARDED_STAGES:
            _merge_shards(module, ctx, stage, config, inputs, force)
        else:
            module.run(ctx)
        manifest = writer.commit(config, inputs, ctx.stats)
    checkpoints.clear(rdir, stage)  # committed: the chunks and trainer checkpoints have done their job
    log.info("%s done in %.1fs %s", label, manifest["timings"]["seconds"], _short(ctx.stats))
    return manifest


def _run_shard(module: Any, ctx: StageContext, shard: int, num_shards: int, config: dict, inputs: dict,
               force: bool, label: str) -> dict[str, Any]:
    """Compute and publish one shard unless it is already there (same config, same inputs)."""
    stage = module.__name__.rsplit(".", 1)[-1]
    rdir = ctx.round_dir
    shards.check_shard_count(rdir, stage, num_shards, config, inputs)
    done = shards.read_shard_manifests(rdir, stage).get(num_shards, {}).get(shard)
    if done is not None and not force:
        changed = mf.diff_config(done["config"], config)
        if changed:
            raise mf.StageConfigChanged(
                f"{rdir.name}/{stage} shard {shard}/{num_shards} was computed with a different config:\n  "
                + "\n  ".join(changed) + f"\nRe-run with the old values, or delete {shards.shard_dir(rdir, stage)}")
        if done["inputs"] == inputs:
            log.info("%s skipped (complete)", label)
            return done
    log.info("%s running", label)
    started = time.time()
    part = module.compute(ctx, shard, num_shards)
    manifest = shards.write_part(rdir, stage, shard, num_shards, part, config, inputs, ctx.stats, started)
    log.info("%s done in %.1fs (%d rows)", label, manifest["timings"]["seconds"], len(part))
    return manifest


def _merge_shards(module: Any, ctx: StageContext, stage: str, config: dict, inputs: dict, force: bool) -> None:
    """Merge a complete set of shards into the stage's outputs: the parts of the shard count on disk (computing any
    still missing here), or, with none on disk, the whole stage computed in this process as one part."""
    rdir = ctx.round_dir
    if force:
        shards.remove_shards(rdir, stage)
    found = shards.matching_shards(rdir, stage, config, inputs)
    if not found:
        part = module.compute(ctx, 0, 1)
        path = ctx.out / f".{shards.part_name(0, 1)}.parquet"
        part.to_parquet(path, index=False)
        part_stats = [dict(ctx.stats)]
        ctx.stats.clear()
        module.merge(ctx, [path], part_stats)
        return
    num_shards = max(found, key=lambda n: len(found[n]))
    for shard in range(num_shards):
        if shard not in found[num_shards]:
            log.info("round %d %s: shard %d/%d missing, computing it here", ctx.round, stage, shard, num_shards)
            shard_ctx = StageContext(cfg=ctx.cfg, run_dir=ctx.run_dir, round=ctx.round, out=rdir,
                                     checkpoint_dir=ctx.checkpoint_dir)
            found[num_shards][shard] = _run_shard(module, shard_ctx, shard, num_shards, config, inputs, False,
                                                  f"round {ctx.round} {stage} shard {shard}/{num_shards}")
    log.info("round %d %s: merging %d shards", ctx.round, stage, num_shards)
    module.merge(ctx, [shards.part_path(rdir, stage, i, num_shards) for i in range(num_shards)],
                 [found[num_shards][i]["stats"] for i in range(num_shards)])
    ctx.stats["shards"] = num_shards


def _short(stats: dict[str, Any]) -> str:
    keep = {k: v for k, v in stats.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return json.dumps(keep)[:300] if keep else ""


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    tmp = run_dir / f".config.yaml.tmp-{os.getpid()}"  # concurrent shard processes each write their own
    tmp.write_text(text)
    tmp.replace(run_dir / "config.yaml")


def remove_stale_temp_files(run_dir: Path) -> int:
    """Delete the hidden temp files (`.name.tmp…`) that a killed process left before its rename; a whole run owns
    its directory, so none of them belongs to a live writer. Returns how many went."""
    stale = [p for p in run_dir.rglob(".*.tmp*") if p.is_file()] if run_dir.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temp files left by an interrupted attempt", len(stale))
    return len(stale)


def run_round(cfg: DictConfig, run_dir: Path, r: int, forced: set[str]) -> dict[str, dict]:
    # A redone stage changes its fingerprint, so the later stages that read it redo themselves through their inputs.
    return {stage: run_stage(cfg, run_dir, stage, r, forced) for stage in STAGES}


def preflight(cfg: DictConfig) -> None:
    """Fail before any work on inputs that would only fail later: the models' directories (config.json, every
    safetensors header with its tensor shapes against config.json, tokenizer, chat template), the reward function,
    and the prompt files (every row checked)."""
    from .modeling import check_weights, load_tokenizer, resolve_model_path
    from .stages.prompts import heldout_prompts, train_prompts

    trust = cfg.model.trust_remote_code
    policy = resolve_model_path(cfg.model.path)
    check_weights(policy, "causal_lm", trust)
    load_tokenizer(policy, trust)
    if cfg.model.reference:
        check_weights(resolve_model_path(cfg.model.reference), "causal_lm", trust)
    if cfg.reward.backend == "function":
        from .rewards.scoring import load_function

        load_function(cfg.reward.function)
    else:
        reward_model = resolve_model_path(cfg.reward.model)
        check_weights(reward_model, "sequence_classification", trust)
        load_tokenizer(reward_model, trust)
    if cfg.prompts.source != "builtin":
        train_prompts(cfg, 0)
        heldout_prompts(cfg)


def run(cfg: DictConfig, run_dir: Path, preflight_done: bool = False) -> list[dict[str, Any]]:
    """All rounds; returns one summary dict per round (also printed as a line each). preflight_done: the CLI has
    run `preflight` on this config already (before Hydra made the run directory)."""
    from .card import write_round_card
    from .report import round_summary, write_report
    from .tracking import open_tracker, round_metrics

    if cfg.compare.arms:  # experiment=compare: a run per arm and seed (selfplay/compare.py)
        from . import compare

        compare.run(cfg, run_dir)
        return []
    forced = set(cfg.force)
    summaries = []
    started = time.time()
    if not preflight_done:
        preflight(cfg)
    remove_stale_temp_files(run_dir)
    # logger=…: one tracker run per run directory, the round as step; rounds already logged are not logged again.
    with open_tracker(cfg, run_dir) as tracker:
        for r in range(cfg.rounds):
            manifests = run_round(cfg, run_dir, r, forced)
            write_round_card(run_dir, r)
            summary = round_summary(r, manifests)
            summaries.append(summary)
            log.info("%s", summary["line"])
            tracker.log_round(r, round_metrics(manifests))
    write_report(run_dir, summaries)
    log.info("run finished in %.1fs: %s", time.time() - started, run_dir)
    return summaries
