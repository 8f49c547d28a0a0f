"""The comparison report of experiment=compare (or of any runs): report.md, compare.json and plots.

For each arm after the last round: the held-out reward and gain over π_0 across seeds, the capability guard
(gain on trained and on eval-only checker families, drift, answer length), the paired differences by seed
against random and explicit, and the verdicts with bootstrap intervals over seeds and prompts (selfplay/core/stats.py).
The numbers are computed first (`comparison_numbers`), then written (`_report_lines`) and drawn (`_plot_*`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from selfplay.core.stats import paired_difference
from selfplay.reports.card import kept_mask
from selfplay.reports.plotting import pyplot, save_figure
from selfplay.rundir import atomic
from selfplay.rundir.layout import round_dir, round_name
from selfplay.rundir.manifest import read_json


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
        for name, label in ((f"{round_name(r)}/eval_generations.parquet", arm),
                            (f"{round_name(0)}/eval_base_generations.parquet", BASE_ARM)):
            path = Path(run_dir) / name
            if path.is_file():
                mine = pd.read_parquet(path, columns=["prompt_id", "reward"]).groupby("prompt_id", as_index=False).mean()
                frames.append(mine.assign(arm=label, seed=int(seed)))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["arm", "seed", "prompt_id", "reward"])
    return table.drop_duplicates(["arm", "seed", "prompt_id"])


def _statistics(runs: pd.DataFrame, arms: list[str], r: int) -> list[dict]:
    """Each arm against π_0, random and explicit (those that ran), paired by seed and prompt."""
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


def _spread(values: pd.Series) -> str:
    mean = values.mean()
    if len(values) < 2:
        return f"{mean:+.3f}" if values.name == "gain" else f"{mean:.3f}"
    return f"{mean:.3f} ± {values.std(ddof=1):.3f}"


def _selected_frames(runs: pd.DataFrame, arm: str, seed: int, r: int = 0) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    mine = runs[(runs["arm"] == arm) & (runs["seed"] == seed)]
    if mine.empty:
        return None
    rdir = round_dir(Path(mine["dir"].iloc[0]), r)
    if not (rdir / "selected.parquet").is_file():
        return None
    pairs = pd.read_parquet(rdir / "pairs.parquet")
    selected = pd.read_parquet(rdir / "selected.parquet")
    return pairs, pairs[kept_mask(pairs, selected).to_numpy()]


def _plot_reward_per_round(compare_dir: Path, runs: pd.DataFrame, arms: list[str]) -> str:
    """Held-out reward per round per arm: mean over seeds, bars min..max across seeds."""
    fig, ax = pyplot().subplots(figsize=(7, 4), dpi=120)
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
    return save_figure(fig, compare_dir / "compare_reward_per_round.png")


def _plot_margins_scatter(compare_dir: Path, frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]], seed: int) -> str:
    """Δex vs |Δim| of round 0's pool, kept pairs in colour, one panel per arm."""
    cols = min(3, len(frames))
    rows = -(-len(frames) // cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), dpi=110, squeeze=False)
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
    return save_figure(fig, compare_dir / "compare_margins_scatter.png")


def _plot_margin_hist(compare_dir: Path, runs: pd.DataFrame, arms: list[str]) -> str:
    """Margin histograms of the selected pairs, every seed's round 0, per arm."""
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.4), dpi=110)
    seeds = sorted(runs["seed"].unique())
    for arm in arms:
        kept = [f[1] for s in seeds if (f := _selected_frames(runs, arm, int(s))) is not None]
        kept = pd.concat(kept, ignore_index=True)
        axes[0].hist(kept["margin_explicit"], bins=12, histtype="step", label=arm)
        axes[1].hist(kept["margin_implicit"].abs(), bins=12, histtype="step", label=arm)
    axes[0].set_xlabel("Δex of selected pairs")
    axes[1].set_xlabel("|Δim| of selected pairs")
    axes[1].legend(fontsize=7)
    return save_figure(fig, compare_dir / "compare_margin_hist.png")


def _plots(compare_dir: Path, runs: pd.DataFrame, arms: list[str]) -> list[str]:
    names = [_plot_reward_per_round(compare_dir, runs, arms)]
    seed = int(runs["seed"].min())
    frames = {arm: f for arm in arms if (f := _selected_frames(runs, arm, seed)) is not None}
    if frames:
        names += [_plot_margins_scatter(compare_dir, frames, seed), _plot_margin_hist(compare_dir, runs, list(frames))]
    return names


GUARD_COLUMNS = (("gain_trained_families", "+.3f"), ("gain_unseen_families", "+.3f"), ("drift_logp_per_token", "+.3f"),
                 ("heldout_response_tokens", ".1f"))


def _final_table(final: pd.DataFrame, arms: list[str]) -> list[dict]:
    """Per arm after the last round: seeds, held-out reward, gain, win rate, pairs and the guard's means."""
    table = []
    for arm in arms:
        mine = final[final["arm"] == arm]
        row = {"arm": arm, "seeds": len(mine), "heldout_reward_mean": mine["heldout_reward"].mean(),
               "heldout_reward_std": mine["heldout_reward"].std(ddof=1) if len(mine) > 1 else None,
               "gain_mean": mine["gain"].mean(), "gain_std": mine["gain"].std(ddof=1) if len(mine) > 1 else None,
               "win_rate_mean": mine["win_rate"].mean(), "selected_mean": mine["selected"].mean()}
        row.update({c: _mean(mine[c]) for c, _ in GUARD_COLUMNS})
        table.append(row)
    return table


def _paired_by_seed(final: pd.DataFrame, arms: list[str]) -> list[dict]:
    """Each arm − random and − explicit on held-out reward, paired by seed (same seed = same round-0 data and
    held-out prompts, so the difference cancels that shared noise)."""
    paired = []
    for reference in ("random", "explicit"):
        if reference not in arms:
            continue
        ref = final[final["arm"] == reference].set_index("seed")["heldout_reward"]
        for arm in arms:
            if arm == reference:
                continue
            diff = (final[final["arm"] == arm].set_index("seed")["heldout_reward"] - ref).dropna()
            if diff.empty:
                continue
            paired.append({"arm": arm, "versus": reference, "seeds": len(diff), "mean_difference": diff.mean(),
                           "std": diff.std(ddof=1) if len(diff) > 1 else float("nan"), "wins": int((diff > 0).sum())})
    return paired


def comparison_numbers(compare_dir: Path, run_dirs: list[Path] | None = None) -> dict | None:
    """Everything the report says, as numbers (None before any run has finished a round)."""
    listed = find_runs(compare_dir) if run_dirs is None else [(*arm_label(d), d) for d in run_dirs]
    runs = _runs(listed)
    if runs.empty:
        return None
    config = read_json(compare_dir / "compare.arms.json") or {}
    arms = [a for a in config.get("arms", []) if a in set(runs["arm"])] or sorted(runs["arm"].unique())
    last = int(runs["round"].max())
    final = runs[runs["round"] == last]
    return {"runs": runs, "arms": arms, "last": last, "final": final, "table": _final_table(final, arms),
            "paired": _paired_by_seed(final, arms), "statistics": _statistics(runs, arms, last),
            "base": runs.groupby("seed")["base_heldout_reward"].first().mean()}


def _final_lines(n: dict) -> list[str]:
    last, final = n["last"], n["final"]
    lines = [f"## After round {last} (π_{last + 1})", "",
             "Capability guard: the gain on held-out prompts of the checker families trained on and of the families "
             "only the eval uses (prompts.eval_only_families), the drift (mean per-token log-prob of π_0's greedy "
             "held-out answers under the policy, minus under π_0) and the held-out answers' mean length.", "",
             "| arm | seeds | held-out reward | gain vs π_0 | win rate vs π_0 | pairs trained on (per round) | "
             "gain, trained families | gain, unseen families | drift (nats/token) | answer tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in n["table"]:
        mine = final[final["arm"] == row["arm"]]
        guard = ["–" if row[c] is None else format(row[c], fmt) for c, fmt in GUARD_COLUMNS]  # means: _final_table
        lines.append(f"| {row['arm']} | {row['seeds']} | {_spread(mine['heldout_reward'])} | "
                     f"{_spread(mine['gain'])} | {mine['win_rate'].mean():.2f} | {row['selected_mean']:.1f} | "
                     + " | ".join(guard) + " |")
    for reference in ("random", "explicit"):
        if reference not in n["arms"]:
            continue
        rows = [d for d in n["paired"] if d["versus"] == reference]
        lines += ["", f"### Paired by seed: arm − {reference} (held-out reward after round {last})", "",
                  "| arm | seeds | mean difference | std | seeds where arm > " + reference + " |", "|---|---|---|---|---|"]
        lines += [f"| {d['arm']} | {d['seeds']} | {d['mean_difference']:+.4f} | {d['std']:.4f} | "
                  f"{d['wins']}/{d['seeds']} |" for d in rows]
    return lines


def _cell(mine: dict, versus: str) -> str:
    d = mine.get(versus)
    return "–" if d is None else f"{d['estimate']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def _verdict_lines(n: dict) -> list[str]:
    statistics = n["statistics"]
    if not statistics:
        return []
    lines = ["", f"## Verdicts (after round {n['last']}; 95% intervals from a bootstrap over seeds, then held-out "
             "prompts within them; selfplay/core/stats.py)", "",
             "| arm | gain vs π_0 | vs random | vs explicit | verdict |", "|---|---|---|---|---|"]
    for arm in n["arms"]:
        mine = {d["versus"]: d for d in statistics if d["arm"] == arm}
        said = [mine[v]["verdict"] for v in ("random", "explicit") if v in mine]
        lines.append(f"| {arm} | {_cell(mine, BASE_ARM)} | {_cell(mine, 'random')} | {_cell(mine, 'explicit')} | "
                     f"{'; '.join(said)} |")
    mdd = [d["mdd_80"] for d in statistics if d["versus"] == "random"]
    if mdd:
        lines += ["", f"Minimum detectable difference against random at 80% power (two-sided 5%): "
                  f"±{float(np.median(mdd)):.3f} (median over arms; 2.8 × the bootstrap s.e.)."]
    return lines


def write_comparison(compare_dir: Path, run_dirs: list[Path] | None = None) -> Path:
    """report.md + compare.json + plots in compare_dir: of the (arm, seed) runs experiment=compare made there, or of
    the given run directories (`selfplay report RUN RUN… --out DIR`, each labelled from its config)."""
    compare_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# selfplay comparison `{compare_dir.name}`", ""]
    n = comparison_numbers(compare_dir, run_dirs)
    if n is None:
        atomic.write_json(compare_dir / "compare.json", {})
        return atomic.write_text(compare_dir / "report.md", "\n".join(lines + ["No run has finished yet."]) + "\n")
    runs, arms = n["runs"], n["arms"]
    plots = _plots(compare_dir, runs, arms)
    lines += [f"{len(runs[['arm', 'seed']].drop_duplicates())} runs: {len(arms)} arms × seeds "
              f"{sorted(int(s) for s in runs['seed'].unique())}, {n['last'] + 1} round(s) each. Held-out reward of "
              f"π_0: {n['base']:.3f}. Spread = sample std across seeds (ddof 1).", ""]
    lines += [f"![{p}]({p})" for p in plots] + [""]
    lines += _final_lines(n) + _verdict_lines(n)
    lines += ["", "Per-run reports: " + ", ".join(
        f"[{a} seed {s}]({os.path.relpath(Path(d) / 'report.md', compare_dir)})"
        for a, s, d in runs[["arm", "seed", "dir"]].drop_duplicates().itertuples(index=False)), ""]
    atomic.write_json(compare_dir / "compare.json", {"runs": runs.to_dict(orient="records"), "final": n["table"],
                                                     "paired": n["paired"], "base_heldout_reward": n["base"],
                                                     "statistics": n["statistics"]})
    return atomic.write_text(compare_dir / "report.md", "\n".join(lines) + "\n")


def is_comparison(path: Path) -> bool:
    return (path / "compare.arms.json").is_file()
