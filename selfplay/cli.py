"""Command line: `selfplay run | stage NAME | status`. Every option is a Hydra override (see conf/config.yaml).

    selfplay run                                   the embedded default: 3 rounds on CPU, nothing downloaded
    selfplay run rounds=2 selection.metric=random trainer=simpo
    selfplay run -m selection.metric=map,random,explicit           a sweep, one run directory per value
    selfplay stage generate round=1                one stage of one round (SLURM array tasks use this)
    selfplay stage generate round=1 shard=0 num_shards=4   shard 0 of 4 of a sharded stage (generate, score, margin)
    selfplay stage score,pair round=1              several stages of one round, in order
    selfplay submit [--dry-run] [overrides…]       the whole run as SLURM jobs (conf/launcher/slurm.yaml)
    selfplay run -m selection.metric=map,random hydra/launcher=submitit_slurm   a sweep, one SLURM job per run
    selfplay status [RUN_DIR | overrides…] [--json]
    selfplay select INPUT OUTPUT [overrides…]      MAP/baseline selection of an existing preference dataset
    selfplay report RUN_DIR                        rebuild report.md and every round's card.md from the files
    selfplay run experiment=compare                the selection metrics side by side over seeds (selfplay/runner/compare.py)
    selfplay report COMPARE_DIR | RUN RUN… --out DIR   the comparison report of those runs
Re-running the same command resumes: complete stages are skipped.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from selfplay.config import STAGES, conf_dir, run_name_problem, validate
from selfplay.errors import SelfplayError
from selfplay.reports.comparison import find_runs, is_comparison
from selfplay.reports.status import format_status, run_status, status_json
from selfplay.rundir import preemption
from selfplay.rundir.shards import SHARDED_STAGES
from selfplay.runner import runlock, sweeps
from selfplay.runner.sweeps import SWEPT_KEYS_ENV, is_sweep, sweep_jobs, sweep_runs, swept_keys

# The commands that run stages import them (and through them torch, transformers, datasets) when they run: `selfplay
# status`, `report` and `--help` start without them.

log = logging.getLogger("selfplay")
USAGE = __doc__
_task: dict[str, str | None] = {"command": None, "stage": None}


def _app(cfg) -> None:
    from selfplay.backends import precision
    from selfplay.backends.samplers import resolve_backend
    from selfplay.runner import compare, pipeline, upgrade

    logging.getLogger("selfplay").setLevel(logging.INFO)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)
        keys = [o.split("=")[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
        upgrade.pin_old_behaviour(cfg, run_dir, keys)  # a run begun by an older selfplay keeps its old defaults
        upgrade.keep_settled_values(cfg, run_dir, keys)  # and the precision and sampler it began with
        precision.resolve(cfg)  # auto → bf16 or fp32 on this machine, before any manifest records it
        # the default vllm → hf where vLLM is not installed
        resolve_backend(cfg, chosen_by_user=bool({"sampler", "sampler.backend"} & set(keys)),
                        batch_size_by_user="sampler.batch_size" in keys)
        OmegaConf.set_readonly(cfg, True)
        if HydraConfig.get().mode != RunMode.MULTIRUN:  # a sweep's launcher (submitit) keeps its own handlers
            preemption.install()  # SIGTERM/USR1/USR2: stop at the next checkpoint, exit 75 for a requeue
        # One writer per run directory (already held when `_hydra` checked before Hydra started); a sweep's jobs
        # each hold their own. Shards of one stage write disjoint parts and share it.
        runlock.acquire(run_dir, shared=cfg.shard is not None)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            sweeps.record_job(run_dir, list(HydraConfig.get().overrides.task))
        if _task["command"] in ("run", None):  # None: a sweep job started by a Hydra launcher (submitit) runs `run`
            if cfg.shard is not None:
                raise SelfplayError("shard=/num_shards= belong to `selfplay stage generate|score|margin round=R`")
            if cfg.compare.arms:  # experiment=compare: a whole run per arm and seed (selfplay/runner/compare.py)
                compare.run(cfg, run_dir)
            else:
                pipeline.run(cfg, run_dir, preflight_done=_task.get("preflight_done") == "yes")
            return
        stages = _task["stage"].split(",")
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise SelfplayError(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
        if cfg.round is None:
            raise SelfplayError(f"`selfplay stage {_task['stage']}` needs round=R")
        if cfg.shard is not None and (len(stages) > 1 or stages[0] not in SHARDED_STAGES):
            raise SelfplayError(f"shard=/num_shards= apply to one of {', '.join(SHARDED_STAGES)}, "
                                f"not {_task['stage']}")
        for stage in stages:
            pipeline.run_stage(cfg, run_dir, stage, cfg.round, set(cfg.force), cfg.shard, cfg.num_shards)
    except preemption.Preempted as err:
        log.error("%s", err)
        sys.exit(preemption.EXIT_PREEMPTED)  # the job script requeues on this code (selfplay/runner/slurm.py)
    except SelfplayError as err:
        # The message says what to fix; a traceback would only bury it.
        log.error("%s", err)
        sys.exit(2)
    except Exception as err:
        if not disk_full(err):
            raise
        # The failed stage's temp directory is gone already; what finished is kept, so a re-run continues.
        log.error("disk full while writing under %s (%s); free space there (or set output_root=…) and run the same "
                  "command again: finished stages are kept", run_dir, str(err).splitlines()[0][:200])
        sys.exit(2)
    finally:
        preemption.uninstall()


def disk_full(err: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) is the filesystem being full, whichever library wrote:
    an OSError with ENOSPC, or safetensors' and others' wrapped "No space left on device"."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err) or "StorageFull" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _hydra(overrides: list[str]) -> int:
    # Hydra creates the run directory before the config is validated: refuse a run_name that leads elsewhere first.
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "run_name" and (problem := run_name_problem(value)):
            print(f"run_name: {problem}", file=sys.stderr)
            return 2
    sweeps.register()
    multirun = any(o in ("-m", "--multirun") for o in overrides)
    if not multirun and (code := _check_before_hydra(overrides)) is not None:
        return code
    if multirun:  # the jobs' directories are named by these keys (selfplay/runner/sweeps.py)
        swept = swept_keys(overrides)
        for job in sweep_jobs(overrides) or []:  # every job's config checked before Hydra makes the sweep's dirs
            named = " ".join(o for o in job if o.split("=")[0].lstrip("+~") in swept)
            if (code := _check_before_hydra(job, lock=False, label=f"sweep job {named}: ")) is not None:
                return code
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept)
    sys.argv = ["selfplay", *overrides]
    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_app)()
    return 0


def _check_before_hydra(overrides: list[str], lock: bool = True, label: str = "") -> int | None:
    """Validate the config and take the run directory's lock before Hydra creates the directory or writes its
    .hydra/ files and log into it: a bad option (or a run another process is writing) touches nothing. Returns an
    exit code to stop with, or None to go on. A config that does not compose is left to Hydra, whose error names
    the key."""
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except Exception:  # noqa: BLE001 — Hydra reports it below, with the key
        return None
    # Hydra's logging starts with the run; until then (a first run converts the embedded model here) log plainly.
    early = logging.StreamHandler(sys.stderr)
    early.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    log.addHandler(early)
    log.setLevel(logging.INFO)
    try:
        validate(cfg)
        if not lock:  # a sweep's job: its own process checks its inputs and takes its directory's lock
            return None
        if _task["command"] == "run":  # the models, reward function and prompt files, before Hydra starts
            from selfplay.runner.pipeline import preflight

            preflight(cfg)
            _task["preflight_done"] = "yes"
        if not any(o.lstrip("+~").startswith("hydra.run.dir=") for o in overrides):
            runlock.acquire(Path(cfg.output_root) / cfg.run_name, shared=cfg.shard is not None)
    except SelfplayError as err:
        print(f"error: {label}{err}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(early)
    return None


def _status(args: list[str]) -> int:
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    rounds = None
    if args and "=" not in args[0]:
        run_dir = Path(args[0])
    else:
        sweeps.register()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=args)
        run_dir = Path(cfg.output_root) / cfg.run_name
        rounds = cfg.rounds
    if not run_dir.is_dir():
        print(f"selfplay status: no run directory {run_dir}", file=sys.stderr)
        return 2
    if is_sweep(run_dir):  # `selfplay run -m …`: every job's run
        runs = sweep_runs(run_dir)
        if as_json:
            print(json.dumps({d.name: json.loads(status_json(run_status(d, rounds))) for d in runs}, indent=2))
        else:
            print(f"sweep {run_dir}: {len(runs)} runs\n\n" + "\n\n".join(
                f"== {d.name}\n{format_status(run_status(d, rounds))}" for d in runs))
        return 0
    if not is_comparison(run_dir) and not is_run_dir(run_dir):
        print(f"selfplay status: {run_dir} is not a selfplay run, sweep or comparison directory (no config.yaml, "
              "round_XX/ or sweep.json in it)", file=sys.stderr)
        return 2

    if is_comparison(run_dir):  # experiment=compare: every arm × seed run
        runs = find_runs(run_dir)
        if as_json:
            print(json.dumps({f"{arm}/seed{seed}": json.loads(status_json(run_status(d, rounds)))
                              for arm, seed, d in runs}, indent=2))
        else:
            print("\n\n".join(f"== {arm} seed {seed} ({d})\n{format_status(run_status(d, rounds))}"
                                for arm, seed, d in runs) or f"{run_dir}: no run has started yet")
        return 0
    status = run_status(run_dir, rounds)
    print(status_json(status) if as_json else format_status(status))
    return 0


def _select(args: list[str]) -> int:
    """`selfplay select INPUT OUTPUT [overrides…]` (selfplay/runner/offline.py): no run directory, nothing but OUTPUT written."""
    if len(args) < 2 or "=" in args[0] or "=" in args[1]:
        print("usage: selfplay select INPUT OUTPUT [overrides…]   (INPUT: preference pairs .parquet/.jsonl/.json/.csv)",
              file=sys.stderr)
        return 2
    from selfplay.backends.precision import resolve as resolve_precision
    from selfplay.runner.offline import select_dataset

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sweeps.register()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=args[2:])
        validate(cfg, offline=True)
        resolve_precision(cfg)
        OmegaConf.set_readonly(cfg, True)
        counts = select_dataset(cfg, Path(args[0]), Path(args[1]))
    except SelfplayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Hydra's own override errors name the option; show them without a traceback
        if type(err).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{args[1]}: kept {counts['selected']} of {counts['pool']} pairs by {cfg.selection.metric} "
          f"({counts['rows']} rows read, {counts['ties_dropped']} ties and {counts['truncated_dropped']} truncated dropped)")
    return 0


def _report(args: list[str]) -> int:
    """One run: its report.md and cards again. An experiment=compare directory: the comparison report. Several runs:
    a comparison of them (labelled by their selection and seed) in --out DIR."""
    from selfplay.reports.comparison import write_comparison
    from selfplay.reports.run_report import rebuild

    out = None
    if "--out" in args:
        i = args.index("--out")
        if i + 1 >= len(args):
            print("selfplay report: --out needs a directory", file=sys.stderr)
            return 2
        out, args = Path(args[i + 1]), args[:i] + args[i + 2:]
    missing = [a for a in args if not Path(a).is_dir()]
    if not args or missing:
        print("usage: selfplay report RUN_DIR | COMPARE_DIR | RUN_DIR RUN_DIR… [--out DIR]"
              + (f"\nselfplay report: no run directory {missing[0]}" if missing else ""), file=sys.stderr)
        return 2
    # report writes report.md and summary.json into the directory: only into one that is a run (or comparison).
    foreign = [a for a in args if not is_run_dir(Path(a)) and not (len(args) == 1 and is_comparison(Path(a)))]
    if foreign:
        print(f"selfplay report: {foreign[0]} is not a selfplay run directory (no config.yaml or round_XX/ in it); "
              "nothing written", file=sys.stderr)
        return 2
    if len(args) > 1:
        print(write_comparison(out or Path("comparison"), [Path(a) for a in args]))
    elif is_comparison(Path(args[0])):
        print(write_comparison(Path(args[0])))
    else:
        path = rebuild(Path(args[0]))
        print(path)
        if "## Not finished" in path.read_text():
            print(f"selfplay report: {args[0]} is not finished; {path} says which stages are missing", file=sys.stderr)
    return 0


def is_run_dir(directory: Path) -> bool:
    """A directory selfplay made for a run: its config.yaml (written before the first stage), or a round."""
    return (directory / "config.yaml").is_file() and (directory / ".hydra").is_dir() or any(
        p.is_dir() for p in directory.glob("round_[0-9][0-9]"))


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # The stage that was running removed its temp directory on the way out; every finished stage is kept.
        print("\ninterrupted; re-run the same command to resume (finished stages are kept)", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "run":
        _task.update(command="run", stage=None)
        return _hydra(rest)
    if command == "stage":
        if not rest or "=" in rest[0]:
            print("usage: selfplay stage NAME[,NAME…] round=R [shard=i num_shards=n] [overrides…]", file=sys.stderr)
            return 2
        _task.update(command="stage", stage=rest[0])
        return _hydra(rest[1:])
    if command == "status":
        return _status(rest)
    if command == "submit":
        from selfplay.runner.slurm import submit

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            return submit(rest)
        except SelfplayError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if command == "report":
        return _report(rest)
    if command == "select":
        return _select(rest)
    print(f"selfplay: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
