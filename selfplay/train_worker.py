"""One rank of a distributed train stage (started by `accelerate launch`, see selfplay/training/distributed.py).

    python -m selfplay.train_worker CONFIG_YAML RUN_DIR ROUND OUT_DIR CHECKPOINT_DIR

Every rank trains; the main rank writes OUT_DIR/policy and OUT_DIR/stats.json. A selfplay error is printed as one
`error: …` line (the stage shows it) and exits 2 (75 when told to stop: selfplay/rundir/preemption.py).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from omegaconf import OmegaConf

from selfplay.errors import SelfplayError
from selfplay.rundir import preemption
from selfplay.stages.train import train_policy


def main(argv: list[str]) -> int:
    config_path, run_dir, r, out, checkpoint_dir = Path(argv[0]), Path(argv[1]), int(argv[2]), Path(argv[3]), Path(argv[4])
    cfg = OmegaConf.load(config_path)
    # Which host each rank landed on, for the stage's train.ranks.log.
    print(f"selfplay train rank {os.environ.get('RANK', '0')} of {os.environ.get('WORLD_SIZE', '1')} on "
          f"{socket.gethostname()}", flush=True)
    try:
        stats = train_policy(cfg, run_dir, r, out, checkpoint_dir)
    except preemption.Preempted as err:
        print(f"stopped: {err}", file=sys.stderr, flush=True)
        return preemption.EXIT_PREEMPTED
    except SelfplayError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if stats is not None:  # the main rank
        (out / "stats.json").write_text(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
