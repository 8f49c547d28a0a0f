"""The self-play loop: for each round, run the stages in order; each stage is skipped when already complete.

    for round r in 0..rounds-1:
        prompts → generate → score → pair → margin → select → train → eval

Each stage lives in `selfplay/stages/<name>.py` with one entry point `run(ctx) -> stats`, plus three
declarations the runner reads: OUTPUTS (what it writes into the round directory), CONFIG (the config keys its
result depends on, recorded in its manifest) and `requires(round, cfg)` (the upstream stages whose outputs it reads).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from selfplay.backends.engine_keeper import keep_engines
from selfplay.backends.modeling import check_weights, load_tokenizer, resolve_model_path
from selfplay.backends.prompt_sources import heldout_prompts, train_prompts
from selfplay.config import PER_COMMAND_KEYS, STAGES
from selfplay.errors import SelfplayError
from selfplay.reports.card import write_round_card
from selfplay.reports.run_report import round_summary, write_report
from selfplay.reports.tracking import open_tracker, round_metrics
from selfplay.rewards.scoring import load_function
from selfplay.rundir import atomic, checkpoints, shards, tables
from selfplay.rundir import manifest as mf
from selfplay.rundir.layout import round_dir, stage_scratch
from selfplay.stages.base import (
    StageContext,
    check_upstream_configs,
    config_view,
    input_fingerprints,
    stage_config_keys,
    stage_module,
    stage_outputs,
)

log = logging.getLogger("selfplay")


def run_stage(cfg: DictConfig, run_dir: Path, stage: str, r: int, forced: set[str] = frozenset(),
              shard: int | None = None, num_shards: int | None = None) -> dict[str, Any]:
    """Run one stage of one round (or one shard of it) unless already complete; return its manifest."""
    module = stage_module(stage)
    rdir = round_dir(run_dir, r)
    config = config_view(cfg, stage_config_keys(module, cfg))
    inputs = input_fingerprints(cfg, run_dir, stage, r)
    check_upstream_configs(cfg, run_dir, stage, r)
    force = stage in forced or "all" in forced
    label = f"round {r} {stage:<8}" if shard is None else f"round {r} {stage} shard {shard}/{num_shards}"
    decision = mf.decide(rdir, stage, config, inputs, force=force)
    if not decision.run:
        log.info("%s skipped (%s)", label, decision.reason)
        if shard is None:  # a kill after the manifest was written can leave the attempt's scratch behind
            shutil.rmtree(stage_scratch(run_dir, r, stage), ignore_errors=True)
            checkpoints.clear(rdir, stage)
        return mf.read_manifest(rdir, stage)
    input_fingerprints(cfg, run_dir, stage, r, verify=True)  # what it reads is what its manifests say
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
        mf.refuse_changed(f"{rdir.name}/{stage} shard {shard}/{num_shards} was computed",
                          mf.config_changes(done, config),
                          f"Re-run with the old values, or delete {shards.shard_dir(rdir, stage)}")
        if done["inputs"] == inputs:
            log.info("%s skipped (complete)", label)
            return done
    log.info("%s running", label)
    started = time.time()
    part = module.compute(ctx, shard, num_shards)
    manifest = shards.write_part(rdir, stage, shard, num_shards, part, config, inputs, ctx.stats, started)
    log.info("%s done in %.1fs (%d rows)", label, manifest["timings"]["seconds"], manifest["rows"])
    return manifest


def _merge_shards(module: Any, ctx: StageContext, stage: str, config: dict, inputs: dict, force: bool) -> None:
    """Merge a complete set of shards into the stage's outputs: the parts of the shard count on disk (computing any
    still missing here), or, with none on disk, the whole stage computed in this process as one part."""
    rdir = ctx.round_dir
    if force:
        shards.remove_shards(rdir, stage)
    found = shards.matching_shards(rdir, stage, config, inputs)
    if not found:
        path = ctx.out / f".{shards.part_name(0, 1)}.parquet"
        tables.write_frames(path, module.compute(ctx, 0, 1))
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
    """<run>/config.yaml: every option of the run, resolved, less what only one command chose (PER_COMMAND_KEYS)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = OmegaConf.to_container(cfg, resolve=True)
    for key in PER_COMMAND_KEYS:
        settings.pop(key, None)
    # Concurrent shard processes each write their own temp file (named by pid).
    atomic.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(settings))


def remove_stale_temp_files(run_dir: Path) -> int:
    """Delete the hidden temp files (`.name.tmp…`) that a killed process left before its rename; a whole run owns
    its directory, so none of them belongs to a live writer. Returns how many went."""
    stale = [p for p in run_dir.rglob(".*.tmp*") if p.is_file()] if run_dir.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temp files left by an interrupted attempt", len(stale))
    return len(stale)


def run_stages(cfg: DictConfig, run_dir: Path, stages: list[str], r: int, forced: set[str],
               shard: int | None = None, num_shards: int | None = None) -> None:
    """Several stages of one round in order (`selfplay stage a,b,…`, a SLURM job): one set of sampling engines
    serves them all (sampler.keep_engines)."""
    with keep_engines(cfg.sampler.keep_engines):
        for stage in stages:
            run_stage(cfg, run_dir, stage, r, forced, shard, num_shards)


def run_round(cfg: DictConfig, run_dir: Path, r: int, forced: set[str]) -> dict[str, dict]:
    # A redone stage changes its fingerprint, so the later stages that read it redo themselves through their inputs.
    return {stage: run_stage(cfg, run_dir, stage, r, forced) for stage in STAGES}


def preflight(cfg: DictConfig) -> None:
    """Fail before any work on inputs that would only fail later: the models' directories (config.json, every
    safetensors header with its tensor shapes against config.json, tokenizer, chat template), the reward function,
    and the prompt files (every row checked)."""
    trust = cfg.model.trust_remote_code
    policy = resolve_model_path(cfg.model.path)
    check_weights(policy, "causal_lm", trust)
    load_tokenizer(policy, trust)
    if cfg.model.reference:
        check_weights(resolve_model_path(cfg.model.reference), "causal_lm", trust)
    if cfg.reward.backend == "function":
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
    if cfg.compare.arms:
        raise SelfplayError("pipeline.run runs one loop; experiment=compare goes through selfplay.runner.compare.run")
    forced = set(cfg.force)
    summaries = []
    started = time.time()
    if not preflight_done:
        preflight(cfg)
    remove_stale_temp_files(run_dir)
    # logger=…: one tracker run per run directory, the round as step; rounds already logged are not logged again.
    # sampler.keep_engines: eval(r) and generate(r+1) share an engine; rounds reload weights instead of restarting
    with open_tracker(cfg, run_dir) as tracker, keep_engines(cfg.sampler.keep_engines):
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
