"""`selfplay status`: which stages of which rounds are complete (from the manifests alone).

The terminal form is a rounds × stages table (state, rows, seconds); `--json` gives the same for scripts, with
`missing` listing every stage not complete as `round_XX/stage`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selfplay.config import STAGES
from selfplay.rundir.layout import round_dir, round_stage
from selfplay.rundir.manifest import outputs_present, read_manifest
from selfplay.rundir.shards import SHARDED_STAGES, read_shard_manifests

# The stat that counts a stage's output rows.
ROWS_STAT = {"prompts": "rows", "generate": "responses", "score": "responses", "pair": "pairs", "margin": "pairs",
             "select": "selected", "train": "pairs", "eval": "heldout_prompts"}


def run_status(run_dir: Path, rounds: int | None = None) -> dict[str, Any]:
    """Each round's stages: state (done / running / missing / damaged), rows written and seconds taken."""
    found = sorted(int(p.name.split("_")[1]) for p in run_dir.glob("round_[0-9][0-9]") if p.is_dir())
    n_rounds = max(rounds or 0, (found[-1] + 1) if found else 0)
    table = []
    for r in range(n_rounds):
        rdir = round_dir(run_dir, r)
        row: dict[str, Any] = {"round": r, "stages": {}}
        for stage in STAGES:
            m = read_manifest(rdir, stage)
            if m is None:
                # a temp dir means the stage started and has not finished: running now, or killed
                state = "running" if (rdir / f".tmp-{stage}").exists() else "missing"
                row["stages"][stage] = {"state": state}
                # shards on disk (SLURM array tasks that finished): the count of the largest set
                found = read_shard_manifests(rdir, stage) if stage in SHARDED_STAGES else {}
                if found:
                    n = max(found, key=lambda k: len(found[k]))
                    row["stages"][stage].update(state="running", shards_done=len(found[n]), num_shards=n)
            else:
                row["stages"][stage] = {
                    "state": "done" if outputs_present(rdir, m) else "damaged",
                    "rows": m["stats"].get(ROWS_STAT[stage]),
                    "seconds": m["timings"]["seconds"],
                }
        table.append(row)
    missing = [round_stage(row['round'], stage) for row in table for stage, st in row["stages"].items()
               if st["state"] != "done"]
    return {"run_dir": str(run_dir), "rounds": table, "missing": missing}


def format_status(status: dict[str, Any]) -> str:
    mark = {"done": "✓", "missing": "·", "running": "…", "damaged": "✗"}
    width = 14
    lines = [f"run {status['run_dir']}", f"{'round':<6}" + "".join(f"{s:>{width}}" for s in STAGES)]
    for row in status["rounds"]:
        cells = []
        for stage in STAGES:
            st = row["stages"][stage]
            if st["state"] == "done":
                rows = "" if st["rows"] is None else f"{st['rows']}r "
                cells.append(f"✓ {rows}{st['seconds']:.0f}s")
            elif "num_shards" in st:
                cells.append(f"… {st['shards_done']}/{st['num_shards']} shards")
            else:
                cells.append(mark[st["state"]])
        lines.append(f"{row['round']:<6}" + "".join(f"{c:>{width}}" for c in cells))
    total = len(status["rounds"]) * len(STAGES)
    lines.append(f"{total - len(status['missing'])}/{total} stages complete  (✓ done: rows, seconds · missing "
                 "… started, running or interrupted ✗ outputs damaged)")
    return "\n".join(lines)


def status_json(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, default=str)
