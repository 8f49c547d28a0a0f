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

import copy
import errno
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.callbacks import Callbacks  # private: used in `_through_hydra` only
from hydra._internal.utils import _run_hydra, get_args_parser, run_and_report  # private: `_through_hydra` only
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import configure_log, run_job
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from selfplay.config import STAGES, conf_dir, removed_option_problem, run_name_problem, validate
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


@dataclass(frozen=True)
class Task:
    """What `selfplay run|stage` asks of the Hydra job (`_app`), handed to it explicitly. checked: this process
    composed the config once and validated it (and for `run` checked the models, reward and prompts: `preflight`)
    before Hydra made the run directory; a sweep's jobs are composed by Hydra's sweeper and check themselves."""

    command: str = "run"  # "run" or "stage"
    stages: str | None = None  # `selfplay stage NAME[,NAME…]`
    checked: bool = False


def _job(task: Task) -> Callable[[DictConfig], None]:
    """Hydra's task function: `_app` with `task` bound. A partial of module-level names, so a launcher that ships
    it to another process (submitit) pickles it; wrapped, so Hydra names the job after `_app`'s module as before."""
    return functools.update_wrapper(functools.partial(_app, task), _app)


def _app(task: Task, cfg: DictConfig) -> None:
    from selfplay.backends import precision
    from selfplay.backends.samplers import resolve_backend
    from selfplay.runner import compare, pipeline, upgrade

    logging.getLogger("selfplay").setLevel(logging.INFO)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if not task.checked:  # a sweep's job: composed by Hydra's sweeper, checked here
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
        # One writer per run directory (already held when `_check` ran before Hydra started); a sweep's jobs each
        # hold their own. Shards of one stage write disjoint parts and share it.
        runlock.acquire(run_dir, shared=cfg.shard is not None)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            sweeps.record_job(run_dir, list(HydraConfig.get().overrides.task))
        if task.command == "run":
            if cfg.shard is not None:
                raise SelfplayError("shard=/num_shards= belong to `selfplay stage generate|score|margin round=R`")
            if cfg.compare.arms:  # experiment=compare: a whole run per arm and seed (selfplay/runner/compare.py)
                compare.run(cfg, run_dir)
            else:
                pipeline.run(cfg, run_dir, preflight_done=task.checked)
            return
        _run_stages(task.stages or "", cfg, run_dir)
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


def _run_stages(names: str, cfg: DictConfig, run_dir: Path) -> None:
    """`selfplay stage NAME[,NAME…] round=R [shard=i num_shards=n]`: those stages of one round, in order."""
    from selfplay.runner import pipeline

    stages = names.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SelfplayError(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
    if cfg.round is None:
        raise SelfplayError(f"`selfplay stage {names}` needs round=R")
    if cfg.shard is not None and (len(stages) > 1 or stages[0] not in SHARDED_STAGES):
        raise SelfplayError(f"shard=/num_shards= apply to one of {', '.join(SHARDED_STAGES)}, not {names}")
    pipeline.run_stages(cfg, run_dir, stages, cfg.round, set(cfg.force), cfg.shard, cfg.num_shards)


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


def _hydra(task: Task, overrides: list[str]) -> int:
    """`selfplay run|stage [overrides…]`. A plain list of overrides is one run: its config is composed once, checked
    (and the run directory locked) before Hydra creates the directory, then run as Hydra's job. With one of Hydra's
    flags (-m/--multirun sweeps, --cfg, --info, --help …) the arguments go to Hydra's own command line instead."""
    # Hydra creates the run directory before the config is validated: refuse a run_name that leads elsewhere first.
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "run_name" and (problem := run_name_problem(value)):
            print(f"run_name: {problem}", file=sys.stderr)
            return 2
    sweeps.register()
    if any(o in ("-m", "--multirun", "hydra.mode=MULTIRUN") for o in overrides):
        if (code := _check_sweep(overrides)) is not None:
            return code
    elif not any(o.startswith("-") for o in overrides):
        return _through_hydra(_job(replace(task, checked=True)), overrides,
                              check=lambda cfg: _check_run(task, cfg))
    return _through_hydra(_job(task), overrides)


def _check_run(task: Task, cfg: DictConfig) -> int | None:
    """The one run's config, as composed (with its hydra node): checked, and its run directory locked, before Hydra
    creates the directory or writes its .hydra/ files and log into it: a bad option (or a run another process is
    writing) touches nothing. Returns an exit code to stop with, or None to go on."""
    job_cfg = copy.deepcopy(cfg)  # the job's config, as Hydra hands it to `_app`: without the hydra node
    with read_write(job_cfg), open_dict(job_cfg):
        del job_cfg["hydra"]
    return _check(job_cfg, preflight=task.command == "run", lock_dir=Path(cfg.hydra.run.dir))


def _check_sweep(overrides: list[str]) -> int | None:
    """Every job's config of a sweep, checked before Hydra makes the sweep's directories (each job's own process
    takes its directory's lock). A job whose config does not compose is left to Hydra, whose error names the key."""
    swept = swept_keys(overrides)  # the jobs' directories are named by these keys (selfplay/runner/sweeps.py)
    for job in sweep_jobs(overrides) or []:
        try:
            with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
                cfg = compose("config", overrides=job)
        except Exception:  # noqa: BLE001 — Hydra reports it, with the key
            continue
        named = " ".join(o for o in job if o.split("=")[0].lstrip("+~") in swept)
        if (code := _check(cfg, label=f"sweep job {named}: ")) is not None:
            return code
    os.environ[SWEPT_KEYS_ENV] = ",".join(swept)
    return None


def _check(cfg: DictConfig, preflight: bool = False, lock_dir: Path | None = None, label: str = "") -> int | None:
    """validate (and preflight: the models, reward function and prompt files) and take `lock_dir`'s lock; an error
    is printed as one line and returned as exit code 2, else None."""
    # Hydra's logging starts with the run; until then (a first run converts the embedded model here) log plainly.
    early = logging.StreamHandler(sys.stderr)
    early.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    log.addHandler(early)
    log.setLevel(logging.INFO)
    try:
        validate(cfg)
        if preflight:
            from selfplay.runner.pipeline import preflight as check_inputs

            check_inputs(cfg)
        if lock_dir is not None:
            runlock.acquire(lock_dir, shared=cfg.shard is not None)
    except SelfplayError as err:
        print(f"error: {label}{err}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(early)
    return None


def _through_hydra(job: Callable[[DictConfig], None], args: list[str],
                   check: Callable[[DictConfig], int | None] | None = None) -> int:
    """Hydra's private API (hydra._internal, Hydra 1.3) is used here and nowhere else: `run_and_report` (Hydra's
    error report: a config error's message without a traceback, exit 1), `Callbacks` (the hydra.callbacks a job's
    HydraContext carries), `get_args_parser` and `_run_hydra` (hydra.main's body, given `args` instead of sys.argv),
    and the Hydra object's `compose_config` (the compose API without its from_shell=False, so an error's quoting
    hint is the shell's, as hydra.main gives it). With `check`: compose once, check, then run the job as hydra.main
    does (hydra.run.dir, .hydra/*.yaml, the job's log, HydraConfig). Without: Hydra's whole command line."""
    if check is None:
        parser = get_args_parser()
        parser.prog = "selfplay"
        _run_hydra(args=parser.parse_args(args), args_parser=parser, task_function=job,
                   config_path=str(conf_dir()), config_name="config")
        return 0
    if not any(a.startswith("hydra.mode=") for a in args):
        args = [*args, "hydra.mode=RUN"]  # as hydra.main records a single run
    with initialize_config_dir(config_dir=str(conf_dir()), job_name="cli", version_base="1.3"):
        app = GlobalHydra.instance().hydra
        cfg = run_and_report(lambda: app.compose_config("config", args, run_mode=RunMode.RUN))
        if (code := check(cfg)) is not None:
            return code
        configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
        callbacks = Callbacks(cfg)
        callbacks.on_run_start(config=cfg, config_name="config")
        ret = run_job(task_function=job, config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None,
                      hydra_context=HydraContext(config_loader=app.config_loader, callbacks=callbacks))
        callbacks.on_run_end(config=cfg, config_name="config", job_return=ret)
        run_and_report(lambda: ret.return_value)  # the job's exception, reported as hydra.main reports it
    return 0


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
    if command in ("run", "stage", "submit", "select") and (problem := removed_option_problem(rest)):
        print(f"error: {problem}", file=sys.stderr)  # with what replaced it, not as Hydra's unknown key
        return 2
    if command == "run":
        return _hydra(Task("run"), rest)
    if command == "stage":
        if not rest or "=" in rest[0]:
            print("usage: selfplay stage NAME[,NAME…] round=R [shard=i num_shards=n] [overrides…]", file=sys.stderr)
            return 2
        return _hydra(Task("stage", stages=rest[0]), rest[1:])
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
