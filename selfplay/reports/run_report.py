"""Per-round summary lines and the run's report.md (with a plot of reward per round)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from selfplay.config import STAGES
from selfplay.reports.card import write_round_card
from selfplay.reports.plotting import pyplot, save_figure
from selfplay.reports.status import run_status
from selfplay.rundir import atomic, faults
from selfplay.rundir.layout import round_dir, round_name
from selfplay.rundir.manifest import read_manifest


def round_summary(r: int, manifests: dict[str, dict]) -> dict[str, Any]:
    st = {stage: m["stats"] for stage, m in manifests.items()}
    sec = {stage: m["timings"]["seconds"] for stage, m in manifests.items()}
    ev = st["eval"]
    summary = {
        "round": r,
        "prompts": st["pair"]["prompts"],
        "pairs": st["pair"]["pairs"],
        "ties_dropped": st["pair"]["ties_dropped"],
        "selected": st["select"]["selected"],
        "sample_mean_reward": st["score"]["mean_reward"],
        "heldout_reward": ev["mean_reward"],
        "heldout_stderr": ev["stderr_reward"],
        "base_heldout_reward": ev["base_mean_reward"],
        "win_rate_vs_base": ev["win_rate_vs_base"],
        "mean_response_tokens": st["generate"]["mean_response_tokens"],
        "all_tie_fraction": st["pair"]["ties_dropped"] / st["pair"]["prompts"],
        "policy_judge_agreement": st["margin"].get("implicit_agrees_with_judge"),
        "gain_vs_base": ev["reward_gain_vs_base"],
        # absent in runs made before they existed
        "gain_stderr": ev.get("reward_gain_stderr", float("nan")),
        "gain_ci95": [ev.get("reward_gain_ci95_low", float("nan")), ev.get("reward_gain_ci95_high", float("nan"))],
        "gain_p_value": ev.get("reward_gain_p_value", float("nan")),
        # the capability guard (None where the run did not measure it)
        "gain_trained_families": ev.get("gain_trained_families"),
        "gain_unseen_families": ev.get("gain_unseen_families"),
        "drift_logp_per_token": ev.get("drift_logp_per_token"),
        "heldout_response_tokens": ev.get("mean_response_tokens"),
        "seconds": sec,
    }
    times = " ".join(f"{stage} {sec[stage]:.0f}s" for stage in sec)
    summary["line"] = (
        f"round {r}: pairs {summary['pairs']}/{summary['prompts']} prompts (ties dropped {summary['ties_dropped']}), "
        f"kept {summary['selected']} | sample reward {summary['sample_mean_reward']:.3f} | held-out reward "
        f"{summary['heldout_reward']:.3f} (π_0 {summary['base_heldout_reward']:.3f}, gain {summary['gain_vs_base']:+.3f} "
        f"± {summary['gain_stderr']:.3f} s.e., 95% CI {_interval(summary['gain_ci95'])}, p {summary['gain_p_value']:.2g}, "
        f"win rate {summary['win_rate_vs_base']:.2f}) | {times}"
    )
    return summary


def _interval(bounds: list[float]) -> str:
    return f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def _plot(run_dir: Path, summaries: list[dict[str, Any]]) -> str | None:
    plt = pyplot()
    rounds = [s["round"] + 1 for s in summaries]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    # Every policy answers the same held-out prompts, so the error bar is the paired s.e. of its gain over π_0.
    ax.errorbar([0, *rounds], [summaries[0]["base_heldout_reward"]] + [s["heldout_reward"] for s in summaries],
                yerr=[0.0] + [s["gain_stderr"] for s in summaries], marker="o", capsize=3,
                label="held-out reward (bars: paired s.e. of the gain over π_0)")
    ax.plot([s["round"] for s in summaries], [s["sample_mean_reward"] for s in summaries], marker="s",
            linestyle="--", label="mean reward of round's samples (π_r)")
    ax.set_xlabel("policy π_k (k = rounds trained)")
    ax.set_ylabel("reward")
    ax.set_xticks([0, *rounds])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, run_dir / "reward_per_round.png")


def rebuild(run_dir: Path) -> Path:
    """`selfplay report RUN_DIR`: cards and report.md again from the files of every finished round."""
    summaries = []
    r = 0
    while (rdir := round_dir(run_dir, r)).is_dir():
        manifests = {stage: read_manifest(rdir, stage) for stage in STAGES}
        if manifests["select"] is not None:
            write_round_card(run_dir, r)
        if all(m is not None for m in manifests.values()):
            summaries.append(round_summary(r, manifests))
        r += 1
    rounds = OmegaConf.load(run_dir / "config.yaml").get("rounds") if (run_dir / "config.yaml").is_file() else None
    return write_report(run_dir, summaries, run_status(run_dir, rounds)["missing"])


def write_report(run_dir: Path, summaries: list[dict[str, Any]], missing: list[str] | None = None) -> Path:
    lines = [f"# selfplay run `{run_dir.name}`", ""]
    if missing:
        lines += ["## Not finished", "", f"{len(missing)} stage(s) have not finished: {', '.join(missing)}. The "
                  "tables below cover the complete rounds only; re-run the run's command to finish it.", ""]
    if summaries:
        plot = _plot(run_dir, summaries)
        lines += [f"![reward per round]({plot})", ""]
        lines += ["| round | prompts | pairs | ties | selected | sample reward (π_r) | held-out reward (π_r+1) | "
                  "gain vs π_0 (paired s.e.) | 95% interval | p (paired) | win rate vs π_0 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s['round']} | {s['prompts']} | {s['pairs']} | {s['ties_dropped']} | {s['selected']} | "
                  f"{s['sample_mean_reward']:.3f} | {s['heldout_reward']:.3f} | {s['gain_vs_base']:+.3f} "
                  f"({s['gain_stderr']:.3f}) | {_interval(s['gain_ci95'])} | {s['gain_p_value']:.2g} | "
                  f"{s['win_rate_vs_base']:.2f} |" for s in summaries]
        lines += ["", "Gain: held-out reward of π_r+1 minus π_0's on the same prompts; its interval is ±1.96 paired s.e., "
                  "its p-value a paired sign-flip permutation test (selfplay/core/stats.py `paired_gain`)."]
        lines += ["", f"Held-out reward of π_0: {summaries[0]['base_heldout_reward']:.3f}.", ""]
        lines += ["## Drift across rounds", "",
                  "Policy–judge agreement: the share of the round's pairs that π_r already orders like the judge "
                  "(implicit margin > 0). Rising means the policy is learning the judge's preferences on its own "
                  "fresh samples; all-tie prompts give no pair and so no training signal.", "",
                  "Drift: the mean per-token log-prob of π_0's greedy held-out answers under π_r+1, minus under π_0 "
                  "(eval.drift=true; a judge-free sign of how far the policy has moved from what it used to say).", "",
                  "| round | mean response tokens (π_r) | all-tie prompts | policy–judge agreement | drift of π_r+1 "
                  "(nats/token) |", "|---|---|---|---|---|"]
        lines += [f"| {s['round']} | {s['mean_response_tokens']:.1f} | {s['all_tie_fraction']:.0%} | "
                  f"{'–' if s['policy_judge_agreement'] is None else format(s['policy_judge_agreement'], '.0%')} | "
                  f"{'–' if s.get('drift_logp_per_token') is None else format(s['drift_logp_per_token'], '+.3f')} |"
                  for s in summaries]
        lines += [""]
        lines += ["Per-round data cards: " + ", ".join(f"[round {s['round']}]({round_name(s['round'])}/card.md)"
                                                    for s in summaries), ""]
        lines += ["## Seconds per stage", "", "| round | " + " | ".join(summaries[0]["seconds"]) + " |",
                  "|---" * (len(summaries[0]["seconds"]) + 1) + "|"]
        lines += [f"| {s['round']} | " + " | ".join(f"{v:.0f}" for v in s["seconds"].values()) + " |" for s in summaries]
    path = atomic.write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    atomic.write_json(run_dir / "summary.json", [{k: v for k, v in s.items() if k != "line"} for s in summaries])
    faults.point("run/report/written")
    return path
