"""A data card per round: `round_XX/card.md` with PNG plots, rebuilt from the round's files alone.

Shows what a person would rather see than grep: the reward distribution of every sample, Δex against |Δim|
with the pairs kept and dropped and the MAP cut, both margins' histograms for kept vs dropped, the length bias
(chosen vs rejected lengths, reward vs length), ties, three example pairs in full, and each stage's time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from selfplay.config import STAGES, round_seed
from selfplay.core.selection import PAIR_KEY, select
from selfplay.reports.plotting import pyplot, save_figure
from selfplay.rundir import atomic, faults, tables
from selfplay.rundir.layout import round_dir
from selfplay.rundir.manifest import read_manifest

PLOTS = ("card_rewards.png", "card_margins_scatter.png", "card_margin_hist.png", "card_length_bias.png")


def _text(messages: Any) -> str:
    return messages[0]["content"] if len(messages) else ""


def kept_mask(pairs: pd.DataFrame, selected: pd.DataFrame) -> pd.Series:
    """Which of the round's pairs the select stage kept (a prompt may give several pairs; accumulated pairs of
    earlier rounds are not in this round's pool)."""
    if "round" in selected and len(pairs):
        selected = selected[selected["round"] == selected["round"].iloc[0]]
    kept = pd.MultiIndex.from_frame(selected[PAIR_KEY])
    return pd.Series(pd.MultiIndex.from_frame(pairs[PAIR_KEY]).isin(kept), index=pairs.index)


def card_numbers(scores: pd.DataFrame, pairs: pd.DataFrame, selected: pd.DataFrame) -> dict[str, Any]:
    """Every figure the card prints, from the round's scores, pairs and selected frames."""
    per_prompt = scores.groupby("prompt_id")["reward"]
    kept = kept_mask(pairs, selected)
    return {
        "prompts": int(scores["prompt_id"].nunique()),
        "samples": len(scores),
        "mean_reward": float(scores["reward"].mean()),
        "all_tie_prompts": int((per_prompt.max() == per_prompt.min()).sum()),
        "pairs": len(pairs),
        "kept": int(kept.sum()),
        "dropped": int((~kept).sum()),
        "mean_margin_explicit_kept": float(pairs.loc[kept, "margin_explicit"].mean()) if kept.any() else None,
        "mean_margin_explicit_dropped": float(pairs.loc[~kept, "margin_explicit"].mean()) if (~kept).any() else None,
        "mean_abs_margin_implicit_kept": float(pairs.loc[kept, "margin_implicit"].abs().mean()) if kept.any() else None,
        "mean_abs_margin_implicit_dropped": (float(pairs.loc[~kept, "margin_implicit"].abs().mean())
                                             if (~kept).any() else None),
        "mean_tokens_chosen": float(pairs["n_tokens_chosen"].mean()) if len(pairs) else None,
        "mean_tokens_rejected": float(pairs["n_tokens_rejected"].mean()) if len(pairs) else None,
        "reward_length_correlation": (float(np.corrcoef(scores["reward"], scores["n_tokens"])[0, 1])
                                      if scores["reward"].std() > 0 and scores["n_tokens"].std() > 0 else None),
    }


def _plots(rdir: Path, scores: pd.DataFrame, pairs: pd.DataFrame, selected: pd.DataFrame) -> None:
    plt = pyplot()
    kept = kept_mask(pairs, selected)

    fig, ax = plt.subplots(figsize=(5, 3), dpi=110)
    ax.hist(scores["reward"], bins=20, color="tab:blue", alpha=0.8)
    ax.set_xlabel("reward")
    ax.set_ylabel("samples")
    ax.set_title("reward of every sample")
    save_figure(fig, rdir / PLOTS[0])

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    abs_im = pairs["margin_implicit"].abs()
    ax.scatter(pairs.loc[~kept, "margin_explicit"], abs_im[~kept], s=16, c="tab:gray", label="dropped")
    ax.scatter(pairs.loc[kept, "margin_explicit"], abs_im[kept], s=16, c="tab:red", label="kept")
    if "z_margin_explicit" in selected and len(selected) and len(pairs) > 1:
        # MAP keeps z(Δex) − w·z(|Δim|) ≥ s*, a straight line in (Δex, |Δim|): |Δim| = m_im + s_im (z_ex − s*) / w
        w, cut = float(selected["map_weight"].iloc[0]), float(selected["score"].min())
        ex, im = pairs["margin_explicit"], abs_im
        if w > 0 and ex.std(ddof=0) > 0 and im.std(ddof=0) > 0:
            xs = np.linspace(ex.min(), ex.max(), 50)
            ys = im.mean() + im.std(ddof=0) * ((xs - ex.mean()) / ex.std(ddof=0) - cut) / w
            ax.plot(xs, ys, "k--", lw=1, label="MAP cut")
            ax.set_ylim(0, max(im.max(), 1e-9) * 1.1)
    ax.set_xlabel("explicit margin Δex")
    ax.set_ylabel("|implicit margin Δim|")
    ax.legend(fontsize=8)
    save_figure(fig, rdir / PLOTS[1])

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=110)
    for ax, col, name in ((axes[0], "margin_explicit", "Δex"), (axes[1], "margin_implicit", "Δim")):
        bins = np.histogram_bin_edges(pairs[col], bins=15) if len(pairs) else 10
        ax.hist(pairs.loc[~kept, col], bins=bins, alpha=0.6, color="tab:gray", label="dropped")
        ax.hist(pairs.loc[kept, col], bins=bins, alpha=0.6, color="tab:red", label="kept")
        ax.set_xlabel(name)
        ax.legend(fontsize=8)
    save_figure(fig, rdir / PLOTS[2])

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=110)
    axes[0].scatter(pairs["n_tokens_rejected"], pairs["n_tokens_chosen"], s=14)
    top = max(pairs[["n_tokens_chosen", "n_tokens_rejected"]].max().max(), 1) if len(pairs) else 1
    axes[0].plot([0, top], [0, top], "k--", lw=1)
    axes[0].set_xlabel("rejected tokens")
    axes[0].set_ylabel("chosen tokens")
    axes[1].scatter(scores["n_tokens"], scores["reward"], s=8, alpha=0.5)
    axes[1].set_xlabel("response tokens")
    axes[1].set_ylabel("reward")
    save_figure(fig, rdir / PLOTS[3])


def _example(row: pd.Series, label: str) -> list[str]:
    def block(text: str) -> str:
        return "\n".join("    " + line for line in (text or "(empty)").splitlines())

    return [f"#### {label}: score {row['score']:.3f}, Δex {row['margin_explicit']:.3f}, Δim {row['margin_implicit']:.3f}",
            "", "Prompt:", "", block(_text(row["prompt"])), "",
            f"Chosen (reward {row['reward_chosen']:.3f}):", "", block(_text(row["chosen"])), "",
            f"Rejected (reward {row['reward_rejected']:.3f}):", "", block(_text(row["rejected"])), ""]


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


TEXT = tables.PAIR_TEXT


def _without_text(path: Path) -> pd.DataFrame:
    """A pairs table without its text columns, with `file_row` (its row in the file) to fetch the text by."""
    frame = tables.read_columns(path, [c for c in tables.column_names(path) if c not in TEXT])
    return frame.assign(file_row=np.arange(len(frame)))


def write_round_card(run_dir: Path, r: int) -> Path:
    """Write round_XX/card.md and its plots (needs the round's select stage; later stages are optional)."""
    rdir = round_dir(run_dir, r)
    # Narrow columns only (a round may be millions of rows); the three example pairs' text is read by row.
    scores = tables.read_columns(rdir / "scores", ["prompt_id", "reward", "n_tokens"])
    pairs, selected = (_without_text(rdir / name) for name in ("pairs.parquet", "selected.parquet"))
    numbers = card_numbers(scores, pairs, selected)
    _plots(rdir, scores, pairs, selected)
    manifests = {s: read_manifest(rdir, s) for s in STAGES}

    lines = [f"# Round {r}", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k.replace('_', ' ')} | {_fmt(v)} |" for k, v in numbers.items()]
    lines += ["", "![rewards](card_rewards.png)", "", "![margins](card_margins_scatter.png)", "",
              "![margin histograms](card_margin_hist.png)", "", "![length bias](card_length_bias.png)", ""]
    lines += ["## Stages", "", "Peak RSS is the process's peak at the end of the stage.", "",
              "| stage | seconds | throughput | peak RSS (MB) | config hash | chat template sha256 |",
              "|---|---|---|---|---|---|"]
    for stage, m in manifests.items():
        if m is None:
            lines.append(f"| {stage} | not run | | | | |")
            continue
        tokens = m["stats"].get("tokens")
        rate = f"{tokens / m['timings']['seconds']:.0f} tok/s" if tokens and m["timings"]["seconds"] else ""
        template = m["stats"].get("chat_template_sha256", "")
        rss = m["timings"].get("peak_rss_mb")
        lines.append(f"| {stage} | {m['timings']['seconds']:.1f} | {rate} | {'–' if rss is None else f'{rss:.0f}'} | "
                     f"`{m['config_hash']}` | {f'`{template}`' if template else ''} |")
    if len(pairs):
        sel = manifests["select"]["config"]["selection"]
        source = rdir / "pairs.parquet"
        if sel["metric"] == "real":  # the similarities were computed for the stage; the file keeps the kept ones
            ranked, where = selected[selected["round"] == r] if "round" in selected else selected, "kept pairs"
            source = rdir / "selected.parquet"
        else:
            # The whole pool ranked exactly as the select stage ranked it (same metric, weight and seed).
            weight = float(selected["map_weight"].iloc[0]) if "map_weight" in selected and len(selected) else sel["weight"]
            ranked = select(pairs, sel["metric"], weight, top_k=None, ratio=1.0, signed=sel.get("signed", False),
                            seed=round_seed(manifests["select"]["config"]["seed"], r))
            where = "whole pool"
        lines += ["", f"## Example pairs ({where}, by selection score)", ""]
        for label, i in (("highest", 0), ("median", len(ranked) // 2), ("lowest", len(ranked) - 1)):
            row = ranked.iloc[i]
            text = tables.read_rows(source, int(row["file_row"]), int(row["file_row"]) + 1, TEXT).iloc[0]
            lines += _example(pd.concat([row, text]), label)
    path = atomic.write_text(rdir / "card.md", "\n".join(lines) + "\n")
    atomic.write_json(rdir / "card.json", numbers)
    faults.point(faults.stage_label(rdir.name, "card", "written"))
    return path
