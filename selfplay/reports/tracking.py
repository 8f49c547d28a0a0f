"""Experiment tracking, `logger=none|tensorboard|wandb`: one tracker run per self-play run, the round as step.

    tracker = open_tracker(cfg, run_dir)        # fails at once, naming the pip package, if it is missing
    tracker.log_round(r, round_metrics(manifests))
    tracker.close()

Two streams go to the same place:
  * per-round scalars, read from the round's stage manifests (`round_metrics`): `eval/mean_reward`,
    `select/pairs`, `score/mean_reward`, `margin/mean_margin_implicit`, `train/final_loss`, `time/generate_s`…
    with step = round. TensorBoard: `<run_dir>/tensorboard/`; W&B: `<run_dir>/wandb/`.
  * the trainer's own metrics (`train/loss`, `train/rewards/margins`…, step = optimizer step), through TRL's
    `report_to` (`trainer_report_to`). TensorBoard: `<run_dir>/tensorboard/round_XX_train/` (a round's trainer
    restarts its step at 0, so each round is its own TensorBoard run); W&B: the same run as the rounds.

Resume: every round is logged once. A ledger beside the logs (`.logged_rounds.json`: round → hash of the logged
values) makes a re-run skip the rounds already logged, so re-running a finished command writes nothing. A round
whose values changed (a stage was redone, `force=[…]`) is logged again; TensorBoard then opens its writer with
`purge_step=round`, so readers drop the superseded points of that round and the later ones (which are logged
again in the same run of the loop). A redone train stage replaces its round's `round_XX_train/` directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from selfplay.errors import SelfplayError
from selfplay.rundir import atomic
from selfplay.rundir.layout import round_name

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
LEDGER = ".logged_rounds.json"


class TrackerUnavailable(SelfplayError):
    """The configured logger's package is not installed."""


def _require_package(module: str, logger: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TrackerUnavailable(
            f"logger={logger} needs the `{module}` package: pip install {module} "
            f"(or pip install -e '.[tracking]'), or run with logger=none"
        )


# ---------------------------------------------------------------- per-round metrics from the manifests

def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# (namespace/name, stage, stats key): what a round logs, every value as its stage's manifest recorded it.
ROUND_SCALARS = (
    ("eval/mean_reward", "eval", "mean_reward"),
    ("eval/win_rate_vs_base", "eval", "win_rate_vs_base"),
    ("eval/base_mean_reward", "eval", "base_mean_reward"),
    ("eval/reward_gain_vs_base", "eval", "reward_gain_vs_base"),
    ("eval/reward_gain_stderr", "eval", "reward_gain_stderr"),
    ("eval/mean_response_tokens", "eval", "mean_response_tokens"),
    ("generate/mean_response_tokens", "generate", "mean_response_tokens"),
    ("generate/hit_length_limit", "generate", "hit_length_limit"),
    ("score/mean_reward", "score", "mean_reward"),
    ("score/std_reward", "score", "std_reward"),
    ("pair/pairs", "pair", "pairs"),
    ("pair/ties_dropped", "pair", "ties_dropped"),
    ("pair/mean_margin_explicit", "pair", "mean_margin_explicit"),
    ("margin/mean_margin_implicit", "margin", "mean_margin_implicit"),
    ("margin/implicit_agrees_with_judge", "margin", "implicit_agrees_with_judge"),
    ("select/pairs", "select", "selected"),
    ("select/pool", "select", "pool"),
    ("select/mean_margin_explicit", "select", "mean_margin_explicit_selected"),
    ("select/mean_abs_margin_implicit", "select", "mean_abs_margin_implicit_selected"),
    ("select/map_weight", "select", "map_weight"),
    ("train/mean_soft_label", "train", "mean_soft_label"),
    ("train/first_loss", "train", "first_loss"),
    ("train/final_loss", "train", "final_loss"),
    ("train/steps", "train", "steps"),
)


def round_metrics(manifests: Mapping[str, Mapping[str, Any] | None]) -> dict[str, float]:
    """A round's scalars from its stage manifests (`round_XX/<stage>.done.json`); absent or non-numeric values
    (e.g. a loss that was never logged) are left out."""
    metrics: dict[str, float] = {}
    for name, stage, key in ROUND_SCALARS:
        manifest = manifests.get(stage)
        value = _number((manifest or {}).get("stats", {}).get(key))
        if value is not None:
            metrics[name] = value
    seconds = 0.0
    for stage, manifest in manifests.items():
        if manifest is not None:
            metrics[f"time/{stage}_s"] = float(manifest["timings"]["seconds"])
            seconds += float(manifest["timings"]["seconds"])
    metrics["time/round_s"] = seconds
    return metrics


# ---------------------------------------------------------------- trackers

def _values_hash(metrics: Mapping[str, float]) -> str:
    return hashlib.sha256(json.dumps(dict(metrics), sort_keys=True).encode()).hexdigest()[:16]


class Tracker:
    """`logger=none`: logs nothing. The base of the real trackers, which add `_write` and `_close`."""

    directory: Path | None = None

    def __init__(self) -> None:
        self._ledger: dict[str, str] = {}
        if self.directory is not None and (self.directory / LEDGER).exists():
            self._ledger = json.loads((self.directory / LEDGER).read_text())

    def log_round(self, r: int, metrics: Mapping[str, float]) -> bool:
        """Log round r's scalars with step r, unless exactly these values were logged already. True if written."""
        if self.directory is None:
            return False
        key = _values_hash(metrics)
        if self._ledger.get(str(r)) == key:
            return False
        superseded = [k for k in self._ledger if int(k) >= r]
        self._write(r, dict(metrics), rewrite=bool(superseded))
        for k in superseded:
            del self._ledger[k]
        self._ledger[str(r)] = key
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.directory / LEDGER, json.dumps(self._ledger, indent=1, sort_keys=True) + "\n")
        return True

    def _write(self, r: int, metrics: dict[str, float], rewrite: bool) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path):
        _require_package("tensorboard", "tensorboard")
        self.directory = run_dir / TENSORBOARD_DIR
        self._writer = None
        super().__init__()

    def _write(self, r: int, metrics: dict[str, float], rewrite: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if rewrite:
            # A round logged before is logged again: a new file whose start marker at step r makes readers drop
            # the older points of steps ≥ r (the later rounds follow in this same loop).
            self.close()
            self._writer = SummaryWriter(log_dir=str(self.directory), purge_step=r)
        elif self._writer is None:  # opened only when something is written: a finished re-run adds no file
            self._writer = SummaryWriter(log_dir=str(self.directory))
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=r)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _wandb_run_id(run_dir: Path, run_name: str) -> str:
    """The W&B run id of this run directory: made once from its name and path, then kept in the directory."""
    path = run_dir / WANDB_DIR / ".selfplay_run_id"
    if path.exists():
        return path.read_text().strip()
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-")[:40] or "run"
    run_id = f"{slug}-{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def _wandb_init(cfg: Any, run_dir: Path) -> tuple[Any, bool]:
    """This self-play run's W&B run (joined if this process already has it open); True if opened here."""
    _require_package("wandb", "wandb")
    import wandb
    if wandb.run is not None:
        return wandb, False
    name = cfg.run_name if run_dir.name == cfg.run_name else f"{cfg.run_name}/{run_dir.name}"  # a sweep's job
    wandb.init(
        project=os.environ.get("WANDB_PROJECT", "selfplay"),
        name=name,
        group=cfg.run_name,
        id=_wandb_run_id(run_dir, cfg.run_name),
        resume="allow",
        dir=str(run_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
        mode=None if os.environ.get("WANDB_MODE") else "offline",  # the user's WANDB_MODE wins
    )
    return wandb, True


class WandbTracker(Tracker):
    def __init__(self, cfg: Any, run_dir: Path):
        self._wandb, self._owned = _wandb_init(cfg, run_dir)
        self.directory = run_dir / WANDB_DIR
        super().__init__()
        self._wandb.define_metric("round")

    def _write(self, r: int, metrics: dict[str, float], rewrite: bool) -> None:
        # Named metrics with the round as x-axis (the trainer's callback puts "*" on train/global_step).
        for name in metrics:
            self._wandb.define_metric(name, step_metric="round")
        self._wandb.log({"round": r, **metrics})

    def close(self) -> None:
        if self._owned and self._wandb.run is not None:
            self._wandb.finish()
        self._owned = False


def open_tracker(cfg: Any, run_dir: Path) -> Tracker:
    """The tracker `cfg.logger` names: a no-op for `none`."""
    logger = cfg.get("logger", "none")
    if logger == "tensorboard":
        return TensorBoardTracker(run_dir)
    if logger == "wandb":
        return WandbTracker(cfg, run_dir)
    return Tracker()


# ---------------------------------------------------------------- the trainer's own metrics

@contextlib.contextmanager
def trainer_report_to(cfg: Any, run_dir: Path, r: int) -> Iterator[str | list[str]]:
    """TRL's `report_to` for round r's trainer; build the trainer and train inside the block.

    tensorboard: transformers' TensorBoardCallback takes its directory from TENSORBOARD_LOGGING_DIR when it is
    built (TrainingArguments has no logging_dir in transformers 5), so the variable is set for the block only;
    the round's directory is emptied first, so a redone train stage leaves one set of events.
    wandb: the callback logs into the W&B run already open in this process (the pipeline's), or into this
    run's, opened here (`selfplay stage train`) and finished after the block."""
    logger = cfg.get("logger", "none")
    if logger == "tensorboard":
        _require_package("tensorboard", "tensorboard")
        logdir = run_dir / TENSORBOARD_DIR / f"{round_name(r)}_train"
        shutil.rmtree(logdir, ignore_errors=True)
        logdir.mkdir(parents=True)
        before = os.environ.get("TENSORBOARD_LOGGING_DIR")
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(logdir)
        try:
            yield ["tensorboard"]
        finally:
            if before is None:
                os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
            else:
                os.environ["TENSORBOARD_LOGGING_DIR"] = before
    elif logger == "wandb":
        wandb, owned = _wandb_init(cfg, run_dir)
        try:
            yield ["wandb"]
        finally:
            if owned:
                wandb.finish()
    else:
        yield "none"


__all__ = ["Tracker", "TrackerUnavailable", "open_tracker", "round_metrics", "trainer_report_to"]
