"""The self-play loop: for each round, run the stages in order; each stage is skipped when already complete.

    for round r in 0..rounds-1:
        prompts → generate → score → pair → margin → select → train → eval

Each stage lives in `selfplay/stages/<name>.py` with one entry point `run(ctx) -> stats`, plus three
declarations the runner reads: OUTPUTS (what it writes into the round directory), CONFIG (the config keys its
result depends on, recorded in its manifest) and `requires(round)` (the upstream stages whose outputs it reads).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

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


def config_view(cfg: DictConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    """The listed (dotted) config keys, as plain values, for a stage's manifest."""
    view = {}
    for key in keys:
        value = OmegaConf.select(cfg, key)
        view[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
    return view


@dataclass
class StageContext:
    """What a stage sees: the config, where it reads (round dirs) and where it writes (`out`)."""

    cfg: DictConfig
    run_dir: Path
    round: int
    out: Path
    stats: dict[str, Any] = field(default_factory=dict)

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


def _input_fingerprints(cfg: DictConfig, run_dir: Path, stage: str, r: int) -> dict[str, str]:
    inputs: dict[str, str] = {}
    for up_round, up_stage in stage_module(stage).requires(r):
        manifest = mf.read_manifest(round_dir(run_dir, up_round), up_stage)
        if manifest is None:
            raise StageInputMissing(
                f"round_{r:02d}/{stage} needs round_{up_round:02d}/{up_stage}, which has not finished; "
                f"run `selfplay stage {up_stage} round={up_round}` (or `selfplay run`) first"
            )
        inputs[f"round_{up_round:02d}/{up_stage}"] = manifest["fingerprint"]
    if r == 0 and stage in ("generate", "margin", "train", "eval"):
        # The base policy is an input of round 0's stages that run it; later rounds inherit it through round 0.
        inputs["base_policy"] = _policy_fingerprint(cfg)
    return inputs


def _policy_fingerprint(cfg: DictConfig) -> str:
    from .modeling import resolve_model_path

    path = resolve_model_path(cfg.model.path)
    files = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
    return mf.fingerprint({"files": files, "config": (path / "config.json").read_text()})


def run_stage(cfg: DictConfig, run_dir: Path, stage: str, r: int, forced: set[str] = frozenset()) -> dict[str, Any]:
    """Run one stage of one round unless its manifest says it is complete; return its manifest."""
    module = stage_module(stage)
    rdir = round_dir(run_dir, r)
    config = config_view(cfg, module.CONFIG)
    inputs = _input_fingerprints(cfg, run_dir, stage, r)
    decision = mf.decide(rdir, stage, config, inputs, force=stage in forced or "all" in forced)
    if not decision.run:
        log.info("round %d %-8s skipped (%s)", r, stage, decision.reason)
        return mf.read_manifest(rdir, stage)
    log.info("round %d %-8s running (%s)", r, stage, decision.reason)
    save_config(cfg, run_dir)  # the config that produces what follows; a refused run never gets here
    with mf.StageWriter(rdir, stage, stage_outputs(module, r)) as writer:
        ctx = StageContext(cfg=cfg, run_dir=run_dir, round=r, out=writer.tmp)
        module.run(ctx)
        manifest = writer.commit(config, inputs, ctx.stats)
    log.info("round %d %-8s done in %.1fs %s", r, stage, manifest["timings"]["seconds"], _short(ctx.stats))
    return manifest


def _short(stats: dict[str, Any]) -> str:
    keep = {k: v for k, v in stats.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return json.dumps(keep)[:300] if keep else ""


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir / "config.yaml")


def run_round(cfg: DictConfig, run_dir: Path, r: int, forced: set[str]) -> dict[str, dict]:
    # A redone stage changes its fingerprint, so the later stages that read it redo themselves through their inputs.
    return {stage: run_stage(cfg, run_dir, stage, r, forced) for stage in STAGES}


def run(cfg: DictConfig, run_dir: Path) -> list[dict[str, Any]]:
    """All rounds; returns one summary dict per round (also printed as a line each)."""
    from .card import write_round_card
    from .report import round_summary, write_report
    from .tracking import open_tracker, round_metrics

    forced = set(cfg.force)
    summaries = []
    started = time.time()
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
