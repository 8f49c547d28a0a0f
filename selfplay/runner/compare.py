"""experiment=compare: the selection metrics side by side, at the same data budget, over several seeds.

    selfplay run experiment=compare                       (conf/experiment/compare.yaml: arms × seeds)
    selfplay run experiment=compare compare.arms=[map,random] compare.seeds=[0,1,2,3]
    selfplay report outputs/compare                       rebuild report.md from the finished runs

Each (arm, seed) is a whole run in <run>/<arm>/seed<k>/, with the arm's selection and the seed; everything else is
the run's config, so every arm keeps the same top_k (except `all`, which keeps every pair). An arm is a metric
(map explicit implicit random real all), and for map optionally `-auto`, `-w<number>` and `-signed`
(map-auto, map-w2.5, map-signed-auto). Round 0's stages before select do not depend on the arm: the first run of a
seed computes them and the other arms of that seed take its files (hard links; their manifests still check config
and inputs, so nothing is taken that would differ). π_0's held-out generations come from the eval cache.
After each run the comparison report is rewritten (report.md, compare.json, plots), so a partial comparison can be
read while the rest runs, and a re-run of the same command resumes.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfplay.config import parse_arm
from selfplay.reports.comparison import write_comparison
from selfplay.rundir import atomic
from selfplay.rundir.layout import round_dir
from selfplay.rundir.manifest import read_manifest
from selfplay.rundir.shards import link_or_copy
from selfplay.runner import pipeline

log = logging.getLogger("selfplay")

SHARED_ROUND0 = ("prompts", "generate", "score", "pair", "margin")


def arm_config(cfg: DictConfig, arm: str, seed: int) -> DictConfig:
    child = copy.deepcopy(cfg)
    OmegaConf.set_readonly(child, False)
    for key, value in parse_arm(arm).items():
        child.selection[key] = value
    child.seed = seed
    child.compare.arms = []
    child.run_name = f"{cfg.run_name}-{arm}-seed{seed}"
    OmegaConf.set_readonly(child, True)
    return child


def adopt_round0(siblings: list[Path], run_dir: Path) -> list[str]:
    """Hard-link round 0's arm-independent stages from a sibling run that finished them; returns the stages taken.
    The manifest goes last, as a stage's own commit does, so an interrupted adoption is simply not there."""
    taken = []
    target = round_dir(run_dir, 0)
    for stage in SHARED_ROUND0:
        if read_manifest(target, stage) is not None:
            continue
        source = next((round_dir(s, 0) for s in siblings if read_manifest(round_dir(s, 0), stage) is not None), None)
        if source is None:
            break
        target.mkdir(parents=True, exist_ok=True)
        # The outputs (anything already there is replaced: it has no manifest), then the manifest.
        for name in [*read_manifest(source, stage)["outputs"], f"{stage}.done.json"]:
            dst = target / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            with atomic.replacing(dst) as tmp:
                tmp.unlink(missing_ok=True)  # a killed attempt's, if this pid made one before
                link_or_copy(source / name, tmp)
        taken.append(stage)
    return taken


def run(cfg: DictConfig, run_dir: Path) -> Path:
    """Every (seed, arm) run, seed by seed; the comparison report after each."""
    arms, seeds = list(cfg.compare.arms), list(cfg.compare.seeds)
    pipeline.save_config(cfg, run_dir)
    atomic.write_json(run_dir / "compare.arms.json", {"arms": arms, "seeds": seeds})
    total = len(arms) * len(seeds)
    done = 0
    for seed in seeds:
        for arm in arms:
            child_dir = run_dir / arm / f"seed{seed}"
            siblings = [run_dir / other / f"seed{seed}" for other in arms if other != arm]
            taken = adopt_round0(siblings, child_dir)
            done += 1
            log.info("compare %d/%d: %s seed %d%s", done, total, arm, seed,
                     f" (round 0 {', '.join(taken)} taken from another arm of seed {seed})" if taken else "")
            pipeline.run(arm_config(cfg, arm, seed), child_dir)
            write_comparison(run_dir)
    return write_comparison(run_dir)
