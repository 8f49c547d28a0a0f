"""Why `selection.weight=auto` picks the w it picks, on the pools of an experiment=compare run, and how its kept set
and gain compare with the fixed weights beside it.

    .venv/bin/python bench/analyze_auto_weight.py outputs/compare_v2 [--out bench/results/compare_cpu_v2]

For every seed (each seed's round-0 pool is shared by all arms): the pool size, the Pearson correlation of z(Δex)
and z(|Δim|) (which is auto's w when positive), the w auto recorded, how many of its kept pairs each other arm also
kept, and every arm's held-out gain over π_0 after the last round (from the runs' summary.json). It also re-scores
each pool under a grid of fixed w and reports, per w, the overlap with explicit's kept set, so the table shows
where on the explicit ↔ MAP line auto lands. Writes auto_weight.md (and .json) to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from selfplay.core.selection import PAIR_KEY, auto_weight, select

GRID = (0.0, 0.25, 0.5, 1.0, 2.5)


def _keys(frame: pd.DataFrame) -> set[tuple]:
    return set(map(tuple, frame[PAIR_KEY].to_numpy().tolist()))


def _final_gain(run_dir: Path) -> float | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    return float(json.loads(path.read_text())[-1]["gain_vs_base"])


def seed_rows(compare_dir: Path) -> list[dict]:
    rows = []
    arms = sorted(p.name for p in compare_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    seeds = sorted({int(p.name[4:]) for a in arms for p in (compare_dir / a).glob("seed*") if p.name[4:].isdigit()})
    for seed in seeds:
        auto_dir = compare_dir / "map-auto" / f"seed{seed}" / "round_00"
        if not (auto_dir / "selected.parquet").is_file():
            continue
        pool = pd.read_parquet(auto_dir / "pairs.parquet")
        kept = pd.read_parquet(auto_dir / "selected.parquet")
        top_k = len(kept)
        ex, im = pool["margin_explicit"].to_numpy(), pool["margin_implicit"].to_numpy()
        row = {"seed": seed, "pool": len(pool), "kept": top_k,
               "corr_ex_absim": float(np.corrcoef(ex, np.abs(im))[0, 1]) if len(pool) > 1 else None,
               "corr_ex_im": float(np.corrcoef(ex, im)[0, 1]) if len(pool) > 1 else None,
               "auto_w": float(kept["map_weight"].iloc[0]), "auto_w_recomputed": auto_weight(ex, im)}
        auto_keys = _keys(kept)
        for arm in arms:
            selected = compare_dir / arm / f"seed{seed}" / "round_00" / "selected.parquet"
            if arm != "map-auto" and selected.is_file():
                row[f"shared_with_{arm}"] = len(auto_keys & _keys(pd.read_parquet(selected)))
        explicit = _keys(select(pool, "explicit", top_k=top_k))
        for w in GRID:
            row[f"w{w:g}_shared_with_explicit"] = len(_keys(select(pool, "map", weight=w, top_k=top_k)) & explicit)
        row["gains"] = {arm: _final_gain(compare_dir / arm / f"seed{seed}") for arm in arms}
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    arms = sorted({a for r in rows for a in r["gains"]})
    lines = ["| seed | pool | kept | r(Δex, |Δim|) | r(Δex, Δim) | auto w | "
             + " | ".join(f"w={w:g} ∩ explicit" for w in GRID) + " |",
             "|---" * (6 + len(GRID)) + "|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['pool']} | {r['kept']} | {r['corr_ex_absim']:+.3f} | {r['corr_ex_im']:+.3f} | "
                     f"{r['auto_w']:.3f} | " + " | ".join(str(r[f'w{w:g}_shared_with_explicit']) for w in GRID) + " |")
    lines += ["", "Kept pairs map-auto shares with each arm (round 0):", "",
              "| seed | " + " | ".join(a for a in arms if a != "map-auto") + " |",
              "|---" * len(arms) + "|"]
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(str(r.get(f"shared_with_{a}", "–")) for a in arms
                                                     if a != "map-auto") + " |")
    lines += ["", "Held-out gain over π_0 after the last round, per seed:", "",
              "| seed | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join("–" if r["gains"][a] is None else f"{r['gains'][a]:+.3f}"
                                                     for a in arms) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compare_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = seed_rows(args.compare_dir)
    text = markdown(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "auto_weight.md").write_text(f"# selection.weight=auto on `{args.compare_dir}`\n\n" + text)
        (args.out / "auto_weight.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
