"""Fault suite: SIGKILL the tiny 2-round pipeline at seeded random points covering every stage, resume it with the
same command, and check that nothing partial is ever visible and that every resumed run equals an unbroken one.

Two kinds of kill:
* at fault points (selfplay/rundir/faults.py): the process kills itself with SIGKILL the K-th time it crosses a named
  point — the start of a stage, each generate window and training step/checkpoint saved, the moment between a
  stage's outputs being renamed into place and its manifest being written, each round card and the report;
* timed: SIGKILL from outside after a random delay, wherever the run happens to be.

The reference run records the points it crosses (SELFPLAY_FAULT_TRACE). Each chain picks kill points from it in
pipeline order, at most one per stage of a round (a resumed process crosses a stage's points from the start), and
runs the same command again after every kill. After each kill: every manifest's files match their checksums, every
visible file parses, and every finished stage's outputs are byte-identical to the reference run's. After the final
resume: the same selected pairs, policy weights and eval as the reference, and no temp files or checkpoints left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
from conftest import start_cli, tiny_overrides

SEED = 20261126
CHAINS = 3
KILLS_PER_CHAIN = 7
TIMED_KILLS = 4
# Small windows and a checkpoint every step, so generate and train each have several resumable points.
EXTRA = ["sampler.batch_size=2", "sampler.sort_window_batches=1", "trainer.batch_size=1", "trainer.epochs=2",
         "trainer.save_steps=1"]


def _run(overrides: list[str], env: dict[str, str], timeout: float = 600) -> int:
    proc = start_cli("run", *overrides, env=env)
    return proc.wait(timeout=timeout)


def _timed_run(overrides: list[str], delay: float) -> int:
    proc = start_cli("run", *overrides)
    try:
        return proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def _stage_of(label: str) -> str:
    return label.split("/")[1]


def partial_files(run_dir: Path) -> list[str]:
    """Visible files that are not whole: a manifest whose files fail their checksums, or a file that does not parse.
    Hidden temp files and checkpoint directories are a stage's private state and are not looked at here."""
    import pyarrow.parquet as pq
    from safetensors import safe_open

    from selfplay.rundir import manifest as mf

    bad = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        try:
            if path.suffix == ".parquet":
                pq.read_metadata(path)
            elif path.suffix == ".json":
                data = json.loads(path.read_text())
                if path.name.endswith(".done.json"):
                    mf.verify_outputs(path.parent, data, str(path))
            elif path.suffix == ".safetensors":
                with safe_open(path, "pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        f.get_tensor(key)
        except Exception as err:  # noqa: BLE001 (any failure to read is a partial file)
            bad.append(f"{rel}: {type(err).__name__}: {err}")
    return bad


def finished_outputs(run_dir: Path) -> dict[str, dict]:
    """{round_XX/stage: {file: sha256}} of every stage with a manifest."""
    return {f"{m.parent.name}/{m.name[:-len('.done.json')]}":
            {rel: meta["sha256"] for rel, meta in json.loads(m.read_text())["outputs"].items()}
            for m in run_dir.glob("round_*/*.done.json")}


def leftovers(run_dir: Path) -> list[str]:
    """Hidden files left in a run directory, less Hydra's and the run's lock file (selfplay/runner/runlock.py: it stays,
    and the holders' notes go with their holders)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*")
                  if p.name not in (".hydra", ".lock") and ".hydra" not in p.relative_to(run_dir).parts)


def assert_same_result(run_dir: Path, reference: Path) -> None:
    import torch
    from safetensors.torch import load_file

    for r in (0, 1):
        rd, ref = run_dir / f"round_{r:02d}", reference / f"round_{r:02d}"
        pd.testing.assert_frame_equal(pd.read_parquet(rd / "selected.parquet"), pd.read_parquet(ref / "selected.parquet"),
                                      check_exact=True)
        weights, ref_weights = load_file(rd / "policy" / "model.safetensors"), load_file(ref / "policy" / "model.safetensors")
        assert weights.keys() == ref_weights.keys()
        assert all(torch.equal(weights[k], ref_weights[k]) for k in weights), f"round {r} policy differs"
        assert json.loads((rd / "eval.json").read_text()) == json.loads((ref / "eval.json").read_text())
    assert (run_dir / "report.md").is_file()


def plan_kills(trace: list[str], rng: random.Random) -> list[list[str]]:
    """CHAINS lists of `label#K` specs in pipeline order, at most one per (round, stage) slot in a chain; together
    the chains cover every stage."""
    slots: dict[str, list[str]] = defaultdict(list)  # "r00/generate" → its specs in trace order
    seen: dict[str, int] = defaultdict(int)
    for label in trace:
        seen[label] += 1
        slots[label.rsplit("/", 1)[0]].append(f"{label}#{seen[label]}")
    order = list(slots)
    stages = sorted({_stage_of(label) for label in trace})
    chains: list[set[str]] = [set() for _ in range(CHAINS)]
    for i, stage in enumerate(rng.sample(stages, len(stages))):  # every stage once, spread over the chains
        chains[i % CHAINS].add(rng.choice([slot for slot in order if _stage_of(slot) == stage]))
    for chain in chains:
        free = [s for s in order if s not in chain]
        chain.update(rng.sample(free, KILLS_PER_CHAIN - len(chain)))
    return [[rng.choice(slots[slot]) for slot in sorted(chain, key=order.index)] for chain in chains]


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_equals_an_unbroken_run(tmp_path, tiny_policy, tiny_reward_model, capsys):
    rng = random.Random(SEED)
    trace_file = tmp_path / "trace.txt"
    reference_overrides = [*tiny_overrides(tmp_path, tiny_policy, tiny_reward_model, run_name="reference"), *EXTRA]
    started = time.time()
    assert _run(reference_overrides, {"SELFPLAY_FAULT_TRACE": str(trace_file)}) == 0
    reference_seconds = time.time() - started
    reference = tmp_path / "reference"
    reference_outputs = finished_outputs(reference)
    trace = trace_file.read_text().split()
    stages_in_trace = {_stage_of(label) for label in trace}
    assert {"prompts", "generate", "score", "pair", "margin", "select", "train", "eval", "card", "report"} \
        <= stages_in_trace

    kills, stages_hit, partial, resumes, matched = [], set(), [], 0, 0

    def after_kill(run_dir: Path, what: str) -> None:
        nonlocal resumes, matched
        partial.extend(f"after {what}: {p}" for p in partial_files(run_dir))
        done = finished_outputs(run_dir)
        same = all(done[stage] == reference_outputs[stage] for stage in done)
        resumes += 1
        matched += same
        assert same, f"after {what}: finished stages differ from the reference run"

    for c, chain in enumerate(plan_kills(trace, rng)):
        overrides = [*tiny_overrides(tmp_path, tiny_policy, tiny_reward_model, run_name=f"chain{c}"), *EXTRA]
        run_dir = tmp_path / f"chain{c}"
        for spec in chain:
            code = _run(overrides, {"SELFPLAY_FAULT_KILL": spec})
            assert code == -signal.SIGKILL, f"{spec}: the run was not killed there (exit {code})"
            kills.append(spec)
            stages_hit.add(_stage_of(spec))
            after_kill(run_dir, spec)
        assert _run(overrides, {}) == 0
        assert_same_result(run_dir, reference)
        assert leftovers(run_dir) == [], "temp files or checkpoints left after the run finished"

    timed_dir = tmp_path / "timed"
    overrides = [*tiny_overrides(tmp_path, tiny_policy, tiny_reward_model, run_name="timed"), *EXTRA]
    timed = 0
    for _ in range(TIMED_KILLS):
        code = _timed_run(overrides, rng.uniform(1.0, reference_seconds))
        if code == -signal.SIGKILL:
            timed += 1
            after_kill(timed_dir, "a timed kill")
    assert _run(overrides, {}) == 0
    assert_same_result(timed_dir, reference)
    assert leftovers(timed_dir) == []

    summary = (f"fault suite: {len(kills) + timed} SIGKILLs injected ({len(kills)} at fault points, {timed} timed); "
               f"stages covered: {len(stages_hit)}/{len(stages_in_trace)} ({', '.join(sorted(stages_hit))}); "
               f"resumes matching the reference run: {matched}/{resumes} after kills, "
               f"{CHAINS + 1}/{CHAINS + 1} finished runs; partial files found: {len(partial)}")
    with capsys.disabled():
        print("\n" + summary)
    (Path(os.environ.get("SELFPLAY_FAULT_SUMMARY", tmp_path / "summary.txt"))).write_text(summary + "\n")
    assert partial == []
    assert stages_hit == stages_in_trace
    assert len(kills) + timed >= 20
