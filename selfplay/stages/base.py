"""The stage contract: what a stage module declares, what it is given (StageContext), and how the runner finds a
stage's inputs. Every module in `selfplay/stages/` named in config.STAGES is a stage with one entry point
`run(ctx) -> None` that writes its outputs into `ctx.out` and its figures into `ctx.stats` (a sharded stage, generate,
score or margin, has `compute(ctx, shard, num_shards)` and `merge(ctx, parts, stats)` instead), plus three declarations:

    OUTPUTS              what it writes into the round directory (or OUTPUTS(round))
    CONFIG               the config keys its result depends on, recorded in its manifest (or CONFIG(cfg))
    UNKEYED (optional)   keys it reads that never change its result (window_rows where only memory depends on it)
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


def stage_unkeyed_reads(module: Any) -> tuple[str, ...]:
    """Config keys a stage reads that never change its result (how much it holds at once, not what it writes)."""
    return tuple(getattr(module, "UNKEYED", ()))


# Options that change how a stage works but never its result: left out of manifests, so changing them (or a run
# begun before they existed) never refuses a resume.
RESULT_NEUTRAL = ("trainer.save_steps",)

# The options no stage declares, each with the reason its value is not part of any stage's cache key. Every other
# option is declared by the stages whose results it decides (tests/test_stage_keys.py checks both, and records a
# real run's config reads to prove no stage reads a key outside its own, its upstream stages' and these).
NOT_CACHE_KEYS: dict[str, str] = {
    "run_name": "where the run lives",
    "output_root": "where the run lives",
    "rounds": "how many rounds to run; a round's stages never read it",
    "round": "which round one `selfplay stage` command runs",
    "shard": "which shard one command computes; shards merge into the same result",
    "num_shards": "how many shards; any count gives the single-process result (tests/test_shards.py)",
    "force": "asks for a finished stage to be redone",
    "experiment": "a preset's label; the options it sets are what count",
    "compare": "experiment=compare: which runs to make; each run's stages record their own options",
    "logger": "where metrics are also sent (tensorboard, wandb)",
    "device": "where a stage computes; a run may move between machines (results agree within the numerics, the "
              "precision is recorded)",
    "model.path": "π_0: an input, recorded by its files' fingerprint (base_policy) rather than its path",
    "sampler.num_engines": "how many engines share generation; any count gives the same responses",
    "sampler.gpu_memory_utilization": "an engine's memory, not its responses",
    "sampler.cpu_kv_cache_gb": "an engine's memory, not its responses",
    "sampler.enforce_eager": "how an engine runs its graph, not what it samples",
    "sampler.keep_engines": "whether an engine outlives a stage; a reloaded engine samples what a new one samples "
                            "(tests/test_engine_keeper.py)",
    "ray": "which Ray cluster runs the engines",
    "launcher": "SLURM resources for `selfplay submit`",
}


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


def upstream_stages(stage: str, r: int, cfg: DictConfig) -> set[tuple[int, str]]:
    """Every (round, stage) whose outputs reach `stage` of round r, directly or through other stages."""
    seen: set[tuple[int, str]] = set()
    todo = list(stage_module(stage).requires(r, cfg))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(stage_module(node[1]).requires(node[0], cfg))
    return seen


def check_upstream_configs(cfg: DictConfig, run_dir: Path, stage: str, r: int) -> None:
    """Refuse to run (or reuse) a stage when any stage upstream of it finished with another config. A stage may read
    the keys its upstream stages declare (the dataset card names the sampler's temperature): this check is what
    keeps those reads covered when one stage runs on its own (`selfplay stage eval round=2`), where the upstream
    stages are not run, hence not checked, first."""
    for up_round, up_stage in sorted(upstream_stages(stage, r, cfg)):
        manifest = mf.read_manifest(round_dir(run_dir, up_round), up_stage)
        if manifest is None:
            continue  # a missing direct input is input_fingerprints' to report
        mf.refuse_changed(f"{round_stage(r, stage)} reads {round_stage(up_round, up_stage)}, which finished",
                          mf.config_changes(manifest, config_view(cfg, stage_config_keys(stage_module(up_stage), cfg))),
                          "Re-run with the old values to continue this run, or use another run_name=… for a new run.")


def policy_fingerprint(cfg: DictConfig) -> str:
    path = resolve_model_path(cfg.model.path)
    files = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
    return mf.fingerprint({"files": files, "config": (path / "config.json").read_text()})
