"""The stage contract: what a stage module declares, what it is given (StageContext), and how the runner finds a
stage's inputs. Every module in `selfplay/stages/` named in config.STAGES is a stage with one entry point
`run(ctx) -> None` that writes its outputs into `ctx.out` and its figures into `ctx.stats` (a sharded stage, generate,
score or margin, has `compute(ctx, shard, num_shards)` and `merge(ctx, parts, stats)` instead), plus three declarations:

    OUTPUTS              what it writes into the round directory (or OUTPUTS(round))
    CONFIG               the config keys its result depends on, recorded in its manifest (or CONFIG(cfg))
    requires(round, cfg) the upstream (round, stage) pairs whose outputs it reads

The runner (selfplay/runner/pipeline.py) records CONFIG's view and the upstream manifests' fingerprints in each stage's
manifest, so a changed option or input re-runs exactly the stages it affects.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from selfplay.backends.modeling import resolve_model_path, torch_device
from selfplay.errors import SelfplayError
from selfplay.rundir import manifest as mf
from selfplay.rundir.layout import round_dir, round_stage


class StageInputMissing(SelfplayError):
    """An upstream stage this one reads from has not finished."""


def stage_module(name: str) -> Any:
    return importlib.import_module(f"selfplay.stages.{name}")  # the stage registry: STAGES names the modules


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
    # keyed by the stage's config and inputs (selfplay/rundir/checkpoints.py).
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
            return resolve_model_path(self.cfg.model.path)
        return round_dir(self.run_dir, r - 1) / "policy"

    @property
    def device(self) -> Any:
        return torch_device(self.cfg.device)


def input_fingerprints(cfg: DictConfig, run_dir: Path, stage: str, r: int, verify: bool = False) -> dict[str, str]:
    """The fingerprints of the upstream manifests this stage reads; with verify, their files are checked first."""
    inputs: dict[str, str] = {}
    for up_round, up_stage in stage_module(stage).requires(r, cfg):
        manifest = mf.read_manifest(round_dir(run_dir, up_round), up_stage)
        if manifest is None:
            raise StageInputMissing(
                f"{round_stage(r, stage)} needs {round_stage(up_round, up_stage)}, which has not finished; "
                f"run `selfplay stage {up_stage} round={up_round}` (or `selfplay run`) first"
            )
        if verify:
            mf.verify_outputs(round_dir(run_dir, up_round), manifest, f"{round_stage(up_round, up_stage)}.done.json")
        inputs[round_stage(up_round, up_stage)] = manifest["fingerprint"]
    if r == 0 and (stage in ("generate", "margin", "train", "eval") or (stage == "prompts" and cfg.prompts.evolve)):
        # The base policy is an input of round 0's stages that run it; later rounds inherit it through round 0.
        inputs["base_policy"] = policy_fingerprint(cfg)
    return inputs


def policy_fingerprint(cfg: DictConfig) -> str:
    path = resolve_model_path(cfg.model.path)
    files = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
    return mf.fingerprint({"files": files, "config": (path / "config.json").read_text()})
