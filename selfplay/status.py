"""`selfplay status`: which stages of which rounds are complete (from the manifests alone)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import STAGES
from .manifest import outputs_present, read_manifest


def run_status(run_dir: Path, rounds: int | None = None) -> list[dict[str, Any]]:
    """One row per round: each stage's state (done / stale / missing), rows written and seconds taken."""
    found = sorted(int(p.name.split("_")[1]) for p in run_dir.glob("round_[0-9][0-9]") if p.is_dir())
    n_rounds = max(rounds or 0, (found[-1] + 1) if found else 0)
    table = []
    for r in range(n_rounds):
        rdir = run_dir / f"round_{r:02d}"
        row: dict[str, Any] = {"round": r, "stages": {}}
        for stage in STAGES:
            m = read_manifest(rdir, stage)
            if m is None:
                state = "running" if (rdir / f".tmp-{stage}").exists() else "missing"
                row["stages"][stage] = {"state": state}
            else:
                row["stages"][stage] = {
                    "state": "done" if outputs_present(rdir, m) else "damaged",
                    "seconds": m["timings"]["seconds"],
                    "stats": m["stats"],
                }
        table.append(row)
    return table


def format_status(run_dir: Path, table: list[dict[str, Any]]) -> str:
    mark = {"done": "✓", "missing": "·", "running": "…", "damaged": "✗"}
    header = f"{'round':<6}" + "".join(f"{s:>10}" for s in STAGES)
    lines = [f"run {run_dir}", header]
    for row in table:
        cells = []
        for stage in STAGES:
            st = row["stages"][stage]
            cells.append(f"{mark[st['state']]} {st['seconds']:.0f}s" if st["state"] == "done" else mark[st["state"]])
        lines.append(f"{row['round']:<6}" + "".join(f"{c:>10}" for c in cells))
    done = sum(st["state"] == "done" for row in table for st in row["stages"].values())
    total = len(table) * len(STAGES)
    lines.append(f"{done}/{total} stages complete  (✓ done, · missing, … running or interrupted, ✗ outputs damaged)")
    return "\n".join(lines)


def status_json(table: list[dict[str, Any]]) -> str:
    return json.dumps(table, indent=2, default=str)
