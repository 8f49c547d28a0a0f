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
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from .errors import SelfplayError
from .manifest import read_json, read_manifest, write_json_atomic
from .shards import link_or_copy

log = logging.getLogger("selfplay")

SHARED_ROUND0 = ("prompts", "generate", "score", "pair", "margin")


def parse_arm(arm: str) -> dict[str, Any]:
    """`map-w2.5-signed` → {"metric": "map", "weight": 2.5, "signed": True}; a baseline is its metric's name."""
    from .config import SELECTION_METRICS

    metric, *options = arm.split("-")
    if metric not in SELECTION_METRICS:
        raise SelfplayError(f"compare.arms: {arm!r} is not a metric of {SELECTION_METRICS} (map may add -auto, "
                            "-w<number>, -signed)")
    out: dict[str, Any] = {"metric": metric}
    for option in options:
        if metric != "map":
            raise SelfplayError(f"compare.arms: {arm!r}: options (-{option}) apply to map only")
        if option == "auto":
            out["weight"] = "auto"
        elif option == "signed":
            out["signed"] = True
        elif option.startswith("w"):
            try:
                out["weight"] = float(option[1:])
            except ValueError:
                raise SelfplayError(f"compare.arms: {arm!r}: -{option} is not -w<number>") from None
        else:
            raise SelfplayError(f"compare.arms: {arm!r}: unknown option -{option} (auto, signed, w<number>)")
    return out


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
    target = run_dir / "round_00"
    for stage in SHARED_ROUND0:
        if read_manifest(target, stage) is not None:
            continue
        source = next((s / "round_00" for s in siblings if read_manifest(s / "round_00", stage) is not None), None)
        if source is None:
            break
        target.mkdir(parents=True, exist_ok=True)
        # The outputs (anything already there is replaced: it has no manifest), then the manifest.
        for name in [*read_manifest(source, stage)["outputs"], f"{stage}.done.json"]:
            dst = target / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.parent / f".{dst.name}.tmp-adopt-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            link_or_copy(source / name, tmp)
            tmp.replace(dst)
        taken.append(stage)
    return taken


def run(cfg: DictConfig, run_dir: Path) -> Path:
    """Every (seed, arm) run, seed by seed; the comparison report after each."""
    from . import pipeline

    arms, seeds = list(cfg.compare.arms), list(cfg.compare.seeds)
    pipeline.save_config(cfg, run_dir)
    write_json_atomic(run_dir / "compare.arms.json", {"arms": arms, "seeds": seeds})
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


def arm_label(run_dir: Path) -> tuple[str, int]:
    """(arm, seed) of any run directory, from its config.yaml: the metric, with map's weight and signedness."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    sel = cfg.selection
    arm = sel.metric
    if sel.metric == "map":
        arm += "-auto" if sel.weight == "auto" else f"-w{float(sel.weight):g}"
        arm += "-signed" if sel.get("signed", False) else ""
    return arm, int(cfg.seed)


def find_runs(compare_dir: Path) -> list[tuple[str, int, Path]]:
    """(arm, seed, run directory) of the runs an experiment=compare run made (<arm>/seed<k>/)."""
    return [(d.parent.name, int(d.name.removeprefix("seed")), d) for d in sorted(compare_dir.glob("*/seed*"))
            if d.is_dir() and d.name.removeprefix("seed").isdigit()]


def _runs(runs: list[tuple[str, int, Path]]) -> pd.DataFrame:
    """One row per finished round of every run (their summary.json)."""
    rows = []
    for arm, seed, run_dir in runs:
        for s in read_json(run_dir / "summary.json") or []:
            rows.append({"arm": arm, "seed": seed, "round": s["round"], "heldout_reward": s["heldout_reward"],
                         "base_heldout_reward": s["base_heldout_reward"], "gain": s["gain_vs_base"],
                         "win_rate": s["win_rate_vs_base"], "selected": s["selected"], "pairs": s["pairs"],
                         "gain_trained_families": s.get("gain_trained_families"),
                         "gain_unseen_families": s.get("gain_unseen_families"),
                         "drift_logp_per_token": s.get("drift_logp_per_token"),
                         "heldout_response_tokens": s.get("heldout_response_tokens"), "dir": str(run_dir)})
    return pd.DataFrame(rows)


BASE_ARM = "π_0"


def per_prompt_rewards(runs: pd.DataFrame, r: int) -> pd.DataFrame:
    """arm, seed, prompt_id, reward: every run's held-out reward per prompt after round r, and π_0's per seed."""
    frames = []
    for arm, seed, run_dir in runs[["arm", "seed", "dir"]].drop_duplicates().itertuples(index=False):
        for name, label in ((f"round_{r:02d}/eval_generations.parquet", arm),
                            ("round_00/eval_base_generations.parquet", BASE_ARM)):
            path = Path(run_dir) / name
            if path.is_file():
                mine = pd.read_parquet(path, columns=["prompt_id", "reward"]).groupby("prompt_id", as_index=False).mean()
                frames.append(mine.assign(arm=label, seed=int(seed)))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["arm", "seed", "prompt_id", "reward"])
    return table.drop_duplicates(["arm", "seed", "prompt_id"])


def _statistics(runs: pd.DataFrame, arms: list[str], r: int) -> list[dict]:
    """Each arm against π_0, random and explicit (those that ran), paired by seed and prompt."""
    from .stats import paired_difference

    table = per_prompt_rewards(runs, r)
    out = []
    for arm in arms:
        for versus in (BASE_ARM, "random", "explicit"):
            if versus == arm or versus not in set(table["arm"]) or arm not in set(table["arm"]):
                continue
            try:
                out.append(paired_difference(table, arm, versus).as_dict())
            except ValueError:  # no (seed, prompt) in common yet
                continue
    return out


def _mean(values: pd.Series) -> float | None:
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(values.mean()) if len(values) else None


def _mean_or_dash(values: pd.Series, fmt: str) -> str:
    mean = _mean(values)
    return "–" if mean is None else format(mean, fmt)


def _spread(values: pd.Series) -> str:
    mean = values.mean()
    if len(values) < 2:
        return f"{mean:+.3f}" if values.name == "gain" else f"{mean:.3f}"
    return f"{mean:.3f} ± {values.std(ddof=1):.3f}"


def _selected_frames(runs: pd.DataFrame, arm: str, seed: int, r: int = 0) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    mine = runs[(runs["arm"] == arm) & (runs["seed"] == seed)]
    if mine.empty:
        return None
    rdir = Path(mine["dir"].iloc[0]) / f"round_{r:02d}"
    if not (rdir / "selected.parquet").is_file():
        return None
    from .card import kept_mask

    pairs = pd.read_parquet(rdir / "pairs.parquet")
    selected = pd.read_parquet(rdir / "selected.parquet")
    return pairs, pairs[kept_mask(pairs, selected).to_numpy()]


def _plots(compare_dir: Path, runs: pd.DataFrame, arms: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    # 1. held-out reward per round per arm: mean over seeds, band = min..max across seeds.
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    base = runs.groupby("seed")["base_heldout_reward"].first().mean()
    for i, arm in enumerate(arms):
        per_round = runs[runs["arm"] == arm].groupby("round")["heldout_reward"]
        xs = np.concatenate([[0], per_round.mean().index.to_numpy() + 1])
        mean = np.concatenate([[base], per_round.mean().to_numpy()])
        lo = np.concatenate([[base], per_round.min().to_numpy()])
        hi = np.concatenate([[base], per_round.max().to_numpy()])
        offset = (i - len(arms) / 2) * 0.015  # arms side by side at each round
        ax.errorbar(xs + offset, mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3, label=arm)
    ax.set_xlabel("policy π_k (k = rounds trained)")
    ax.set_xticks(range(int(runs["round"].max()) + 2))
    ax.set_ylabel("held-out reward")
    ax.set_title("held-out reward per round (mean over seeds; bars: min–max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    names.append(_save(fig, compare_dir, "compare_reward_per_round.png"))

    # 2. Δex vs |Δim| of round 0's pool (seed of the first run), kept pairs in colour, one panel per arm.
    seed = int(runs["seed"].min())
    frames = {arm: f for arm in arms if (f := _selected_frames(runs, arm, seed)) is not None}
    if frames:
        cols = min(3, len(frames))
        rows = -(-len(frames) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), dpi=110, squeeze=False)
        for ax, (arm, (pairs, kept)) in zip(axes.flat, frames.items(), strict=False):
            ax.scatter(pairs["margin_explicit"], pairs["margin_implicit"].abs(), s=10, c="tab:gray", label="pool")
            ax.scatter(kept["margin_explicit"], kept["margin_implicit"].abs(), s=12, c="tab:red", label="selected")
            ax.set_title(arm, fontsize=9)
            ax.set_xlabel("Δex", fontsize=8)
            ax.set_ylabel("|Δim|", fontsize=8)
        for ax in list(axes.flat)[len(frames):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"round 0 pool, seed {seed}: what each arm selects", fontsize=10)
        fig.tight_layout()
        names.append(_save(fig, compare_dir, "compare_margins_scatter.png"))

        # 3. margin histograms of the selected pairs, every seed's round 0, per arm.
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
        seeds = sorted(runs["seed"].unique())
        for arm in frames:
            kept = [f[1] for s in seeds if (f := _selected_frames(runs, arm, int(s))) is not None]
            kept = pd.concat(kept, ignore_index=True)
            axes[0].hist(kept["margin_explicit"], bins=12, histtype="step", label=arm)
            axes[1].hist(kept["margin_implicit"].abs(), bins=12, histtype="step", label=arm)
        axes[0].set_xlabel("Δex of selected pairs")
        axes[1].set_xlabel("|Δim| of selected pairs")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        names.append(_save(fig, compare_dir, "compare_margin_hist.png"))
    return names


def _save(fig, directory: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    tmp = directory / f".{name}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(directory / name)
    return name


def write_comparison(compare_dir: Path, run_dirs: list[Path] | None = None) -> Path:
    """report.md + compare.json + plots in compare_dir: of the (arm, seed) runs experiment=compare made there, or of
    the given run directories (`selfplay report RUN RUN… --out DIR`, each labelled from its config)."""
    compare_dir.mkdir(parents=True, exist_ok=True)
    listed = find_runs(compare_dir) if run_dirs is None else [(*arm_label(d), d) for d in run_dirs]
    runs = _runs(listed)
    config = read_json(compare_dir / "compare.arms.json") or {}
    lines = [f"# selfplay comparison `{compare_dir.name}`", ""]
    if runs.empty:
        lines += ["No run has finished yet."]
        path = compare_dir / "report.md"
        write_json_atomic(compare_dir / "compare.json", {})
        path.write_text("\n".join(lines) + "\n")
        return path
    arms = [a for a in config.get("arms", []) if a in set(runs["arm"])] or sorted(runs["arm"].unique())
    last = runs["round"].max()
    final = runs[runs["round"] == last]
    table = []
    for arm in arms:
        mine = final[final["arm"] == arm]
        table.append({"arm": arm, "seeds": len(mine), "heldout_reward_mean": mine["heldout_reward"].mean(),
                      "heldout_reward_std": mine["heldout_reward"].std(ddof=1) if len(mine) > 1 else None,
                      "gain_mean": mine["gain"].mean(), "gain_std": mine["gain"].std(ddof=1) if len(mine) > 1 else None,
                      "win_rate_mean": mine["win_rate"].mean(), "selected_mean": mine["selected"].mean()})
    plots = _plots(compare_dir, runs, arms)
    base = runs.groupby("seed")["base_heldout_reward"].first().mean()
    lines += [f"{len(runs[['arm', 'seed']].drop_duplicates())} runs: {len(arms)} arms × seeds "
              f"{sorted(int(s) for s in runs['seed'].unique())}, {last + 1} round(s) each. Held-out reward of π_0: "
              f"{base:.3f}. Spread = sample std across seeds (ddof 1).", ""]
    lines += [f"![{p}]({p})" for p in plots] + [""]
    lines += [f"## After round {last} (π_{last + 1})", "",
              "Capability guard: the gain on held-out prompts of the checker families trained on and of the families "
              "only the eval uses (prompts.eval_only_families), the drift (mean per-token log-prob of π_0's greedy "
              "held-out answers under the policy, minus under π_0) and the held-out answers' mean length.", "",
              "| arm | seeds | held-out reward | gain vs π_0 | win rate vs π_0 | pairs trained on (per round) | "
              "gain, trained families | gain, unseen families | drift (nats/token) | answer tokens |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        mine = final[final["arm"] == row["arm"]]
        guard = [_mean_or_dash(mine[c], fmt) for c, fmt in (("gain_trained_families", "+.3f"),
                 ("gain_unseen_families", "+.3f"), ("drift_logp_per_token", "+.3f"), ("heldout_response_tokens", ".1f"))]
        lines.append(f"| {row['arm']} | {row['seeds']} | {_spread(mine['heldout_reward'])} | "
                     f"{_spread(mine['gain'])} | {mine['win_rate'].mean():.2f} | {row['selected_mean']:.1f} | "
                     + " | ".join(guard) + " |")
        row.update({c: _mean(mine[c]) for c in ("gain_trained_families", "gain_unseen_families",
                                                "drift_logp_per_token", "heldout_response_tokens")})
    # Same seed = same round-0 data and held-out prompts: arm differences paired by seed cancel that shared noise.
    paired = []
    for reference in ("random", "explicit"):
        if reference not in arms:
            continue
        lines += ["", f"### Paired by seed: arm − {reference} (held-out reward after round {last})", "",
                  "| arm | seeds | mean difference | std | seeds where arm > " + reference + " |", "|---|---|---|---|---|"]
        ref = final[final["arm"] == reference].set_index("seed")["heldout_reward"]
        for arm in arms:
            if arm == reference:
                continue
            mine = final[final["arm"] == arm].set_index("seed")["heldout_reward"]
            diff = (mine - ref).dropna()
            if diff.empty:
                continue
            std = diff.std(ddof=1) if len(diff) > 1 else float("nan")
            paired.append({"arm": arm, "versus": reference, "seeds": len(diff), "mean_difference": diff.mean(),
                           "std": std, "wins": int((diff > 0).sum())})
            lines.append(f"| {arm} | {len(diff)} | {diff.mean():+.4f} | {std:.4f} | {int((diff > 0).sum())}/{len(diff)} |")
    statistics = _statistics(runs, arms, last)
    if statistics:
        lines += ["", f"## Verdicts (after round {last}; 95% intervals from a bootstrap over seeds, then held-out "
                  "prompts within them; selfplay/stats.py)", "",
                  "| arm | gain vs π_0 | vs random | vs explicit | verdict |", "|---|---|---|---|---|"]
        for arm in arms:
            mine = {d["versus"]: d for d in statistics if d["arm"] == arm}

            def cell(versus: str, mine=mine) -> str:
                d = mine.get(versus)
                return "–" if d is None else f"{d['estimate']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"

            said = [mine[v]["verdict"] for v in ("random", "explicit") if v in mine]
            lines.append(f"| {arm} | {cell(BASE_ARM)} | {cell('random')} | {cell('explicit')} | {'; '.join(said)} |")
        mdd = [d["mdd_80"] for d in statistics if d["versus"] == "random"]
        if mdd:
            lines += ["", f"Minimum detectable difference against random at 80% power (two-sided 5%): "
                      f"±{float(np.median(mdd)):.3f} (median over arms; 2.8 × the bootstrap s.e.)."]
    lines += ["", "Per-run reports: " + ", ".join(
        f"[{a} seed {s}]({os.path.relpath(Path(d) / 'report.md', compare_dir)})"
        for a, s, d in runs[["arm", "seed", "dir"]].drop_duplicates().itertuples(index=False)), ""]
    write_json_atomic(compare_dir / "compare.json", {"runs": runs.to_dict(orient="records"), "final": table,
                                                     "paired": paired, "base_heldout_reward": base,
                                                     "statistics": statistics})
    path = compare_dir / "report.md"
    tmp = compare_dir / ".report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def is_comparison(path: Path) -> bool:
    return (path / "compare.arms.json").is_file()
