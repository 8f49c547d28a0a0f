"""Orchestration overhead of a whole `selfplay run`: the wall time of the command against the time its stages spent
in their own work, measured in one run.

    .venv/bin/python bench/bench_overhead.py [--out FILE.json] -- [selfplay run overrides…]

Runs `python -m selfplay.cli run OVERRIDES` as a user would (a fresh process: interpreter start, imports, Hydra),
timing it from outside, then reads every stage manifest the run wrote. A stage's seconds (its manifest's
timings) are its own work: loading its model, computing, writing its outputs. Everything else is overhead: process
start and imports, Hydra's composition and config checks, manifest reads, input verification (sha256 of the
upstream outputs), the round summaries, data cards and report with their plots. Stages that were skipped (a resumed
run) count as overhead, so run it on a new run_name.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from selfplay.config import conf_dir, register

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    run_dir = Path(cfg.output_root) / cfg.run_name
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: the overhead of a resumed run counts its skipped stages; pick a new run_name")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "selfplay.cli", "run", *args.overrides])
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"selfplay run exited {proc.returncode}")
    stages: dict[str, float] = {}
    for manifest in sorted(run_dir.glob("round_*/*.done.json")):
        data = json.loads(manifest.read_text())
        stages[data["stage"]] = stages.get(data["stage"], 0.0) + data["timings"]["seconds"]
    in_stages = sum(stages.values())
    rounds = len(list(run_dir.glob("round_*")))
    overhead = wall - in_stages
    print(f"selfplay run {' '.join(args.overrides)}: {rounds} rounds in {wall:.1f} s wall")
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])))
    print(f"in stages {in_stages:.1f} s; overhead {overhead:.1f} s = {overhead / wall:.1%} of the run "
          f"({overhead / rounds:.1f} s a round)")
    if args.out:
        args.out.write_text(json.dumps({"overrides": args.overrides, "wall_s": wall, "stage_s": stages,
                                        "overhead_s": overhead, "overhead_share": overhead / wall}, indent=1))


if __name__ == "__main__":
    main()
