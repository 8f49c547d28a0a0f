"""`selfplay submit [--dry-run] [overrides…]`: a whole run as a chain of SLURM jobs.

Per round, generate, score and margin run as array jobs when `launcher.<stage>.shards` > 1 (task i computes
shard i, selfplay/rundir/shards.py); every other stage, and each sharded stage's merge, runs in the plain job that
follows. Each job waits for the one before it (`--dependency=afterok`), and `--kill-on-invalid-dep=yes` removes
the rest of the chain when one fails, so nothing is left queued forever.

Re-submitting the same command picks up where the run stands: the jobs of stages that are complete are left out,
and the first unfinished sharded stage's array holds only its missing shards (a failed or cancelled task is retried
alone). Everything after the first unfinished stage is submitted; stages found complete at run time skip.

Nothing from the config reaches a shell unquoted: overrides are passed as one quoted word each, `#SBATCH` values
are checked to be plain SLURM values, and `launcher.setup` lines are written as the shell code they are meant to be.
The job scripts are written to <run>/slurm/ (readable, editable, resubmittable with `sbatch`); `--dry-run` prints
them and the sbatch chain and submits nothing.
"""

from __future__ import annotations

import datetime
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from selfplay.config import STAGES, conf_dir, validate
from selfplay.errors import SelfplayError
from selfplay.rundir import atomic, preemption, shards
from selfplay.rundir import manifest as mf
from selfplay.rundir.layout import round_dir
from selfplay.runner import runlock, sweeps, upgrade
from selfplay.stages.base import StageInputMissing, config_view, input_fingerprints, stage_config_keys, stage_module

# Keys `submit` sets itself in each job; `force` would redo a stage in every array task and merge alike.
REFUSED_KEYS = {"round": "each job gets its own round",
                "shard": "array tasks get their shard from SLURM_ARRAY_TASK_ID",
                "num_shards": "set launcher.<stage>.shards",
                "force": "a forced stage would be redone by every job that touches it; redo it with "
                         "`selfplay stage NAME round=R force=[NAME]`, or submit under a new run_name"}
SWEEP_HINT = "for a sweep on SLURM use `selfplay run -m … hydra/launcher=submitit_slurm`"
PLAIN_PATH = re.compile(r"[^\s\x00-\x1f\x7f'\"\\$`]+")  # a path written into an #SBATCH line
LAST_SUBMISSION = "jobs.json"
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}


@dataclass
class Job:
    """One sbatch submission: `commands` are `selfplay stage …` argument lists, run in order."""

    name: str
    kind: str  # launcher group that sizes it: generate | score | margin | light | train
    commands: list[list[str]] = field(default_factory=list)
    array: list[int] | None = None
    num_shards: int | None = None


def slurm_dir() -> Path:
    """slurm/ (ray_cluster.sh): inside the package when installed from a wheel, else the repo's top level."""
    package = Path(__file__).resolve().parent.parent
    return package / "slurm" if (package / "slurm").is_dir() else package.parent / "slurm"


def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].strip()


def check_overrides(overrides: list[str]) -> None:
    for override in overrides:
        if override in ("-m", "--multirun"):
            raise SelfplayError(f"selfplay submit: {override} is not supported; {SWEEP_HINT}")
        if re.search(r"[\x00-\x1f\x7f]", override):
            raise SelfplayError(f"selfplay submit: override {override!r} holds a control character (newline, tab…)")
        key = override_key(override)
        if key in REFUSED_KEYS:
            raise SelfplayError(f"selfplay submit: {key}= cannot be submitted: {REFUSED_KEYS[key]}")
        if key.startswith("hydra/launcher") or key.startswith("hydra.sweep"):
            raise SelfplayError(f"selfplay submit: {key} is a sweep option; {SWEEP_HINT}")


def _complete(cfg: Any, run_dir: Path, stage: str, r: int) -> bool:
    """Finished with this config (a finished stage whose config changed is refused now, not in a job later)."""
    rdir = round_dir(run_dir, r)
    manifest = mf.read_manifest(rdir, stage)
    if manifest is None or not mf.outputs_present(rdir, manifest):
        return False
    mf.refuse_changed(f"{rdir.name}/{stage} already finished",
                      mf.config_changes(manifest, config_view(cfg, stage_config_keys(stage_module(stage), cfg))),
                      "Submit with the old values, or use another run_name=…")
    return True


def _missing_shards(cfg: Any, run_dir: Path, stage: str, r: int, num_shards: int) -> list[int]:
    """Shards of the run's first unfinished stage that are not on disk yet (its inputs are known: all finished)."""
    try:
        inputs = input_fingerprints(cfg, run_dir, stage, r)
    except StageInputMissing:
        return list(range(num_shards))
    config = config_view(cfg, stage_config_keys(stage_module(stage), cfg))
    done = shards.matching_shards(round_dir(run_dir, r), stage, config, inputs).get(num_shards, {})
    return [i for i in range(num_shards) if i not in done]


def plan(cfg: Any, run_dir: Path) -> list[Job]:
    """The jobs still needed, in chain order."""
    jobs: list[Job] = []
    pending: list[tuple[int, str, bool]] = []  # (round, stage, computes in-process) for the next plain job
    started = False

    def flush() -> None:
        if not pending:
            return
        commands: list[list[str]] = []
        for r in sorted({r for r, _, _ in pending}):
            commands.append(["stage", ",".join(s for rr, s, _ in pending if rr == r), f"round={r}"])
        stages = [s for _, s, _ in pending]
        if {"select", "train", "eval"} & set(stages):
            kind = "train"
        else:
            kind = next((s for _, s, computes in pending if computes and s in shards.SHARDED_STAGES), "light")
        labels = [f"r{r:02d}-{s}" + ("" if computes or s not in shards.SHARDED_STAGES else "-merge")
                  for r, s, computes in pending]
        name = labels[0] + (f"-to-{labels[-1].split('-', 1)[1] if labels[-1][:3] == labels[0][:3] else labels[-1]}"
                            if len(labels) > 1 else "")
        jobs.append(Job(name=name, kind=kind, commands=commands))
        pending.clear()

    for r in range(cfg.rounds):
        for stage in STAGES:
            if not started and _complete(cfg, run_dir, stage, r):
                continue
            num_shards = cfg.launcher[stage].shards if stage in shards.SHARDED_STAGES else 1
            if num_shards > 1:
                array = _missing_shards(cfg, run_dir, stage, r, num_shards) if not started else list(range(num_shards))
                if array:
                    flush()
                    jobs.append(Job(name=f"r{r:02d}-{stage}", kind=stage, array=array, num_shards=num_shards,
                                    commands=[["stage", stage, f"round={r}", 'shard="$SLURM_ARRAY_TASK_ID"',
                                               f"num_shards={num_shards}"]]))
                pending.append((r, stage, False))  # the merge
            else:
                pending.append((r, stage, True))
            started = True
    flush()
    if jobs:  # what `selfplay run` writes after its rounds: report.md with plots and every round's card
        jobs[-1].commands.append(["report", str(run_dir)])
    return jobs


def _array_spec(tasks: list[int]) -> str:
    """0,1,2,5 → 0-2,5"""
    ranges, start = [], tasks[0]
    for prev, cur in zip(tasks, [*tasks[1:], None], strict=True):
        if cur != prev + 1:
            ranges.append(f"{start}-{prev}" if prev > start else str(start))
            start = cur
    return ",".join(ranges)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _starts_engines(cfg: Any, job: Job) -> bool:
    """Whether a stage of `job` runs vLLM engines (which a job of several nodes spreads over a Ray cluster)."""
    stages = {stage for command in job.commands if command[0] == "stage" for stage in command[1].split(",")}
    return bool(cfg.sampler.backend == "vllm" and stages & {"generate", "eval"}
                or cfg.reward.backend == "vllm" and "score" in stages
                or cfg.margin.backend == "vllm" and "margin" in stages)


def render(job: Job, cfg: Any, run_dir: Path, overrides: list[str], python: str, workdir: Path) -> str:
    """The job's sbatch script."""
    launcher = cfg.launcher
    res = launcher[job.kind]
    logs = run_dir / "slurm" / "logs"
    what = (f"round {job.commands[0][2].split('=')[1]} {job.commands[0][1]}, shards {_array_spec(job.array)} of "
            f"{job.num_shards} (array task i computes shard i)" if job.array is not None
            else "; ".join(" ".join(c[1:]) for c in job.commands if c[0] == "stage"))
    options = [
        ("job-name", f"sp-{_safe_name(cfg.run_name)}-{job.name}"),
        ("array", _array_spec(job.array) if job.array is not None else None),
        ("nodes", res.nodes),
        ("ntasks-per-node", 1),
        ("cpus-per-task", res.cpus_per_task),
        ("gpus-per-node", res.gpus_per_node or None),
        ("mem", res.mem),
        ("time", res.time),
        ("partition", res.partition or launcher.partition),
        ("account", launcher.account),
        ("qos", launcher.qos),
        ("output", logs / ("%x-%A_%a.out" if job.array is not None else "%x-%j.out")),
        ("open-mode", "append"),  # a requeued job's log keeps the lines of its earlier attempts
        ("chdir", workdir),
        ("kill-on-invalid-dep", "yes"),  # a failed dependency cancels this job instead of leaving it queued
    ]
    lines = ["#!/bin/bash", f"# selfplay run {run_dir.name}: {what}",
             "# Written by `selfplay submit` (selfplay/runner/slurm.py); edit freely and resubmit with sbatch."]
    lines += [f"#SBATCH --{key}={value}" for key, value in options if value is not None]
    lines.append("#SBATCH --requeue" if launcher.requeue else "#SBATCH --no-requeue")
    if launcher.signal:
        lines.append(f"#SBATCH --signal={launcher.signal}")
    lines += [f"#SBATCH {option}" for option in launcher.sbatch_options]
    lines += ["", "set -euo pipefail", *launcher.setup, f"export SELFPLAY_PYTHON={shlex.quote(python)}"]
    words = [f"run_name={cfg.run_name}", f"output_root={run_dir.parent}", "hydra.output_subdir=null", *overrides]
    lines.append("overrides=(\n" + "".join(f"  {shlex.quote(w)}\n" for w in words) + ")")
    if job.kind == "train" and cfg.trainer.distributed != "none":
        per_node = cfg.trainer.num_processes or res.gpus_per_node or 1
        lines.insert(lines.index("set -euo pipefail"), (
            f"# train: trainer.distributed={cfg.trainer.distributed} starts `accelerate launch` with "
            f"{res.nodes * per_node} processes ({res.nodes} node(s) × {per_node})"
            + (", one launcher per node through `srun --nodes "
               f"{res.nodes} --ntasks-per-node 1`, main address the job's first node" if res.nodes > 1 else "")))
    if res.nodes > 1 and _starts_engines(cfg, job):
        # Several nodes: a Ray cluster across them, joined by the stages' vLLM engines.
        # Ray's own output goes beside the job's log, not into it
        lines.append(f'export RAY_CLUSTER_LOG={shlex.quote(str(logs))}/"$SLURM_JOB_NAME-$SLURM_JOB_ID.ray.log"')
        lines.append(f"source {shlex.quote(str(run_dir / 'slurm' / 'ray_cluster.sh'))}")
        lines.append('overrides+=("ray.address=\'$RAY_ADDRESS\'")')
    if launcher.signal:
        lines += preemption_shell(launcher.signal, launcher.requeue)
    for command in job.commands:
        args = " ".join(a if a.startswith('shard="$') else shlex.quote(a) for a in command)
        tail = ' "${overrides[@]}"' if command[0] == "stage" else ""
        lines.append(("selfplay_step " if launcher.signal else "") + f'"$SELFPLAY_PYTHON" -m selfplay.cli {args}{tail}')
    return "\n".join(lines) + "\n"


def preemption_shell(signal_option: str, requeue: bool) -> list[str]:
    """Job-script lines that run each selfplay command as `selfplay_step …`: the warning signal of --signal=B:SIG@T
    reaches the job script only, so its trap passes it on to the command running; a command that then stops at a
    checkpoint exits EXIT_PREEMPTED (or dies of the signal, should it come before Python took it: nothing is
    published before a stage commits), and the job requeues itself (launcher.requeue) to resume there."""
    sig, seconds = signal_option.split(":", 1)[1].split("@")
    code = preemption.EXIT_PREEMPTED
    # An array task's own id is ARRAYID_TASK: its SLURM_JOB_ID may be the array's, and requeueing that requeues all.
    stopped = f'  echo "selfplay: stopped on SIG{sig} (finished work is kept); '
    then = (['  local job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}',
             stopped + 'requeueing job ${job:=$SLURM_JOB_ID}"',
             '  scontrol requeue "$job" || echo "selfplay: scontrol requeue failed; submit again to resume"']
            if requeue else [stopped + 'not requeued (launcher.requeue=false): submit again to resume"'])
    return [f"# Pre-emption (launcher.signal={signal_option}, launcher.requeue={str(requeue).lower()}): SLURM sends "
            f"SIG{sig} to this script",
            f"# about {seconds} s before the time limit; the trap passes it to the selfplay command running, which",
            f"# finishes its window or optimizer step, checkpoints and exits {code}; "
            + ("then the job requeues itself." if requeue else "the job then fails (no requeue)."),
            "selfplay_stopped() {",
            *then,
            f"  exit {code}",
            "}",
            "selfplay_step() {",
            '  [ -z "${selfplay_signalled:-}" ] || selfplay_stopped  # the signal came between two commands',
            '  "$@" &',
            "  selfplay_pid=$!",
            '  while kill -0 "$selfplay_pid" 2>/dev/null; do wait "$selfplay_pid" || true; done  # a trap cuts wait short',
            "  local rc=0",
            '  wait "$selfplay_pid" || rc=$?',
            f'  if [ -n "${{selfplay_signalled:-}}" ] && {{ [ "$rc" -eq {code} ] || [ "$rc" -eq $((128 + $(kill -l {sig}))) ]; }}; then',
            "    selfplay_stopped",
            "  fi",
            '  return "$rc"',
            "}",
            f"trap 'selfplay_signalled=1; [ -z \"${{selfplay_pid:-}}\" ] || kill -{sig} \"$selfplay_pid\" 2>/dev/null "
            f"|| true' {sig}"]


def _check_path(path: Path, what: str) -> None:
    if not PLAIN_PATH.fullmatch(str(path)):
        raise SelfplayError(f"selfplay submit: the {what} {str(path)!r} has spaces, quotes or control characters; "
                            "SLURM's #SBATCH lines cannot hold it safely — use a plain path")


def _active_jobs(run_slurm: Path) -> list[str]:
    """Jobs of this run's last submission still pending or running."""
    record = mf.read_json(run_slurm / LAST_SUBMISSION)
    if not record:
        return []
    ids = {str(job["id"]) for job in record["jobs"]}
    out = subprocess.run(["squeue", "-h", "-o", "%F %i %T"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SelfplayError(f"selfplay submit: squeue failed: {out.stderr.strip()}")
    return [f"{task} ({state})" for array_id, task, state in (line.split() for line in out.stdout.splitlines())
            if array_id in ids and state in ACTIVE_STATES]


def _sbatch(script: Path, dependency: str | None) -> str:
    command = ["sbatch", "--parsable", *([f"--dependency=afterok:{dependency}"] if dependency else []), str(script)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SelfplayError(f"sbatch {script.name} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def compose(overrides: list[str]) -> Any:
    sweeps.register()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise SelfplayError(f"selfplay submit: {err}") from err
    validate(cfg)
    if cfg.compare.arms:
        raise SelfplayError("selfplay submit: experiment=compare runs its arms one after another in one process; on "
                            "SLURM run them as a sweep (selfplay run -m selection.metric=map,random seed=0,1,2 "
                            "hydra/launcher=submitit_slurm) and compare with selfplay report RUN RUN… --out DIR")
    return cfg


def submit(argv: list[str], out: Any = sys.stdout) -> int:
    dry_run = "--dry-run" in argv
    overrides = [a for a in argv if a != "--dry-run"]
    check_overrides(overrides)
    cfg = compose(overrides)
    run_dir = (Path(cfg.output_root) / cfg.run_name).resolve()
    upgrade.pin_old_behaviour(cfg, run_dir, [override_key(o) for o in overrides])  # as each job will
    upgrade.keep_settled_values(cfg, run_dir, [override_key(o) for o in overrides])
    workdir = Path(cfg.launcher.workdir).absolute() if cfg.launcher.workdir else Path.cwd()
    python = str(Path(cfg.launcher.python or sys.executable).absolute())
    for path, what in ((run_dir, "run directory"), (workdir, "working directory")):
        _check_path(path, what)
    # The jobs get the user's overrides as typed, less those submit writes itself (run dir, launcher).
    passed = [o for o in overrides if override_key(o) not in ("run_name", "output_root")
              and not override_key(o).startswith("launcher")]
    jobs = plan(cfg, run_dir)
    if not jobs:
        print(f"selfplay submit: {run_dir} is complete ({cfg.rounds} rounds); nothing to submit", file=out)
        return 0
    scripts = [(run_dir / "slurm" / f"{job.name}.sbatch", render(job, cfg, run_dir, passed, python, workdir))
               for job in jobs]
    if dry_run:
        for path, text in scripts:
            print(f"# ---- {path} ----\n{text}", file=out)
        print("# ---- the chain `selfplay submit` would submit ----", file=out)
        for i, (path, _) in enumerate(scripts):
            dep = f" --dependency=afterok:$j{i}" if i else ""
            print(f"j{i + 1}=$(sbatch --parsable{dep} {shlex.quote(str(path))})", file=out)
        return 0
    # Refuse at once when a local process is writing the run; the lock is given back before the first job can
    # start (each job takes it itself), so submit never blocks its own chain.
    runlock.acquire(run_dir, command="selfplay submit")
    runlock.release(run_dir)
    if shutil.which("sbatch") is None:
        raise SelfplayError("selfplay submit: sbatch is not on PATH; run it on a SLURM login node (or use --dry-run)")
    run_slurm = run_dir / "slurm"
    active = _active_jobs(run_slurm)
    if active:
        raise SelfplayError(f"selfplay submit: jobs of this run are still in the queue: {', '.join(active)}; "
                            "wait for them or scancel them, then submit again")
    (run_slurm / "logs").mkdir(parents=True, exist_ok=True)
    if any(cfg.launcher[job.kind].nodes > 1 and _starts_engines(cfg, job) for job in jobs):
        shutil.copy2(slurm_dir() / "ray_cluster.sh", run_slurm / "ray_cluster.sh")
    submitted, previous = [], None
    for job, (path, text) in zip(jobs, scripts, strict=True):
        atomic.write_text(path, text)
        previous = _sbatch(path, previous)
        submitted.append({"name": job.name, "id": previous, "script": str(path),
                          "array": _array_spec(job.array) if job.array is not None else None})
        print(f"{previous:>10}  {job.name}" + (f"  array {submitted[-1]['array']}" if job.array else ""), file=out)
    atomic.write_json(run_slurm / LAST_SUBMISSION,
                      {"submitted": datetime.datetime.now().isoformat(timespec="seconds"), "jobs": submitted})
    print(f"submitted {len(submitted)} jobs for {run_dir}; follow with `selfplay status {run_dir}` and "
          f"{run_slurm / 'logs'}", file=out)
    return 0
