"""Calibration sweep of the embedded default: which settings make the policy learn within the time budget.

    .venv/bin/python bench/calibrate_default.py [--arms NAME …] [--runs-root DIR] [--out DIR] [--rounds 3]

Each arm is a full `selfplay run` (a fresh process, as a user runs it) with the overrides listed in ARMS below, one
after the other, so every arm gets the machine to itself. A finished arm is not run again (delete its run
directory to redo it); an interrupted one resumes. After every arm the table, JSON and plot under --out are
rewritten from all finished arms' files (their summary.json and stage manifests), so nothing is copied by hand.

Per arm and round: the held-out gain over π_0 with its paired s.e., 95% interval and sign-flip p-value
(selfplay/core/stats.py), the share of sampled responses that hit `sampler.max_new_tokens`, pairs kept,
optimizer steps, and the wall time of each round's stages.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

# The default as configured in conf/ (arm "default") and the variants measured beside it, each named by what it
# changes. Runs made while the sweep moved the defaults are filed under the arm whose overrides they equal.
ARMS: dict[str, list[str]] = {
    "best_worst": ["pair.strategy=best_worst"],
    "default": [],
    "word_budget60": ["prompts.word_budget=60"],
    "selection_random": ["selection=random"],
    "selection_all": ["selection=all"],
    "sampler_hf": ["sampler=hf"],
}


def _gain_from_files(run_dir: Path, rdir: Path) -> dict:
    """The gain's interval and p-value recomputed from a round's held-out rewards, as eval computes them now."""
    import pandas as pd

    from selfplay.core.stats import paired_gain, prompt_differences

    diff = prompt_differences(pd.read_parquet(rdir / "eval_generations.parquet"),
                              pd.read_parquet(run_dir / "round_00" / "eval_base_generations.parquet"))
    g = paired_gain(diff.to_numpy())
    return {"gain_ci95": [g["reward_gain_ci95_low"], g["reward_gain_ci95_high"]], "gain_p_value": g["reward_gain_p_value"]}


def arm_rows(run_dir: Path) -> list[dict]:
    """One row per finished round of a run: its summary plus what the stage manifests add."""
    rows = []
    for s in json.loads((run_dir / "summary.json").read_text()):
        rdir = run_dir / f"round_{s['round']:02d}"
        stats = {stage: json.loads((rdir / f"{stage}.done.json").read_text())["stats"]
                 for stage in ("generate", "train")}
        gen, train = stats["generate"], stats["train"]
        if not math.isfinite(s.get("gain_p_value", float("nan"))):  # a run made before eval reported them
            s.update(_gain_from_files(run_dir, rdir))
        rows.append({**s, "hit_length_limit_share": gen["hit_length_limit"] / max(gen["responses"], 1),
                     "train_steps": train.get("steps"), "first_loss": train.get("first_loss"),
                     "final_loss": train.get("final_loss"), "round_seconds": sum(s["seconds"].values())})
    return rows


def paired_lines(results: dict[str, dict], reference: str = "default") -> list[str]:
    """Each arm's held-out reward after its last round minus the default's, per held-out prompt (same prompts, same
    seed), with the bootstrap interval and minimum detectable difference of selfplay/core/stats.py."""
    import pandas as pd

    from selfplay.core.stats import paired_difference

    frames = []
    for name, arm in results.items():
        if arm["rounds"] and arm.get("run_dir"):
            last = Path(arm["run_dir"]) / f"round_{arm['rounds'][-1]['round']:02d}" / "eval_generations.parquet"
            frames.append(pd.read_parquet(last, columns=["prompt_id", "reward"]).assign(arm=name, seed=0))
    table = pd.concat(frames, ignore_index=True) if frames else None
    if table is None or reference not in set(table["arm"]):
        return []
    lines = ["", f"Paired by held-out prompt, after each arm's last round: arm − {reference} (95% bootstrap interval; "
             "MDD: the difference this one-seed, 200-prompt design detects with 80% power)", "",
             f"| arm | − {reference} | 95% interval | MDD | verdict |", "|---|---|---|---|---|"]
    for name in results:
        if name == reference or name not in set(table["arm"]):
            continue
        d = paired_difference(table, name, reference)
        lines.append(f"| {name} | {d.estimate:+.3f} | [{d.ci95_low:+.3f}, {d.ci95_high:+.3f}] | ±{d.mdd:.3f} | "
                     f"{d.verdict()} |")
    return lines


def write_results(out: Path, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["| arm | overrides | gain r1 / r2 / r3 (paired s.e.) | 95% interval (last) | p (last) | win rate (last) | "
             "responses at the cap | kept pairs / steps a round | seconds a round | run wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, arm in results.items():
        rows = arm["rounds"]
        if not rows:
            continue
        last = rows[-1]
        gains = " / ".join(f"{r['gain_vs_base']:+.3f} ({r['gain_stderr']:.3f})" for r in rows)
        lo, hi = last.get("gain_ci95", [float("nan")] * 2)
        cap = sum(r["hit_length_limit_share"] for r in rows) / len(rows)
        kept = "/".join(str(r["selected"]) for r in rows) + " · " + "/".join(str(r["train_steps"]) for r in rows)
        secs = sum(r["round_seconds"] for r in rows) / len(rows)
        lines.append(f"| {name} | `{' '.join(arm['overrides']) or '(none)'}` | {gains} | [{lo:+.3f}, {hi:+.3f}] | "
                     f"{last.get('gain_p_value', float('nan')):.2g} | {last['win_rate_vs_base']:.2f} | {cap:.0%} | "
                     f"{kept} | {secs:.0f} | {arm.get('wall_s', float('nan')):.0f} |")
    lines += paired_lines(results)
    (out / "table.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for i, (name, arm) in enumerate(results.items()):
        rows = arm["rounds"]
        if rows:
            x = [0] + [r["round"] + 1 + 0.04 * (i - len(results) / 2) for r in rows]
            ax.errorbar(x, [0.0] + [r["gain_vs_base"] for r in rows], yerr=[0.0] + [r["gain_stderr"] for r in rows],
                        marker="o", capsize=3, label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(max((len(a["rounds"]) for a in results.values()), default=0) + 1))
    ax.set_xlabel("policy π_k (k = rounds trained)")
    ax.set_ylabel("held-out gain over π_0 (bars: paired s.e.)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gain_per_round.png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="*", default=list(ARMS), help="arm names from ARMS (default: all, in order)")
    ap.add_argument("--runs-root", type=Path, default=Path("outputs/calibration"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/default_calibration"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; known: {list(ARMS)}")

    existing = json.loads((args.out / "calibration.json").read_text()) if (args.out / "calibration.json").is_file() else {}
    results = {name: existing.get(name, {"overrides": ARMS[name]}) for name in ARMS}
    for name, arm in results.items():  # every finished round on disk, so the table never lags the files
        arm["overrides"] = ARMS[name]
        arm["rounds"] = arm_rows(args.runs_root / name) if (args.runs_root / name / "summary.json").is_file() else []
        arm["run_dir"] = str(args.runs_root / name)
    for name in args.arms:
        overrides = [f"output_root={args.runs_root}", f"run_name={name}", f"rounds={args.rounds}", *ARMS[name]]
        run_dir = args.runs_root / name
        done = (run_dir / "summary.json").is_file() and len(json.loads((run_dir / "summary.json").read_text())) >= args.rounds
        if not done:
            print(f"[calibrate] {name}: selfplay run {' '.join(overrides)}", flush=True)
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "selfplay.cli", "run", *overrides])
            if proc.returncode != 0:
                raise SystemExit(f"[calibrate] {name}: selfplay run exited {proc.returncode}")
            results[name]["wall_s"] = time.perf_counter() - started
        results[name]["rounds"] = arm_rows(run_dir)
        write_results(args.out, results)
        last = results[name]["rounds"][-1]
        print(f"[calibrate] {name}: gain {last['gain_vs_base']:+.3f} ± {last['gain_stderr']:.3f} after "
              f"{len(results[name]['rounds'])} rounds", flush=True)


if __name__ == "__main__":
    main()
