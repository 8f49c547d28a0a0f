"""`selfplay submit --dry-run`: the job scripts and chain it writes, what it refuses, what it leaves out on resume.

The real submission to a real SLURM cluster is tests/test_slurm.py; these need no cluster."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli, tiny_overrides

from selfplay.runner import pipeline
from selfplay.runner.slurm import compose


def scripts_of(dry_run_stdout: str) -> dict[str, str]:
    """{script name: text} from the dry-run listing."""
    parts = re.split(r"^# ---- (.+) ----$", dry_run_stdout, flags=re.M)
    return {Path(name).name: text.strip() + "\n" for name, text in zip(parts[1::2], parts[2::2], strict=True)
            if name.endswith(".sbatch")}


def test_dry_run_prints_a_readable_chain_and_submits_nothing(tmp_path):
    out = run_cli("submit", "--dry-run", f"output_root={tmp_path}", "run_name=demo", "rounds=2",
                  "launcher.partition=gpu", "launcher.account=proj", "launcher.generate.shards=4",
                  "launcher.generate.gpus_per_node=1", "launcher.margin.shards=2", "launcher.train.gpus_per_node=8",
                  "launcher.train.nodes=1", "launcher.generate.nodes=2", "sampler=vllm")
    assert out.returncode == 0, out.stderr[-2000:]
    scripts = scripts_of(out.stdout)
    assert list(scripts) == ["r00-prompts.sbatch", "r00-generate.sbatch", "r00-generate-merge-to-pair.sbatch",
                             "r00-margin.sbatch", "r00-margin-merge-to-r01-prompts.sbatch", "r01-generate.sbatch",
                             "r01-generate-merge-to-pair.sbatch", "r01-margin.sbatch",
                             "r01-margin-merge-to-eval.sbatch"]
    generate = scripts["r00-generate.sbatch"]
    for line in ("#SBATCH --array=0-3", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --kill-on-invalid-dep=yes",
                 'stage generate round=0 shard="$SLURM_ARRAY_TASK_ID" num_shards=4 "${overrides[@]}"',
                 "ray_cluster.sh",  # two nodes: a Ray cluster across them for the engines
                 # pre-emption on by default: SIGUSR1 120 s before the limit, passed on to the stage; requeue on 75
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "selfplay_step \"$SELFPLAY_PYTHON\" -m selfplay.cli",
                 'scontrol requeue "$job"', "trap "):
        assert line in generate, line
    off = run_cli("submit", "--dry-run", f"output_root={tmp_path}", "launcher.requeue=false", "launcher.signal=null")
    assert off.returncode == 0 and "#SBATCH --no-requeue" in off.stdout and "--signal" not in off.stdout
    assert "selfplay_step" not in off.stdout and "scontrol requeue" not in off.stdout
    train = scripts["r00-margin-merge-to-r01-prompts.sbatch"]
    assert "#SBATCH --gpus-per-node=8" in train and "stage margin,select,train,eval round=0" in train
    assert "stage prompts round=1" in train
    assert "-m selfplay.cli report" in scripts["r01-margin-merge-to-eval.sbatch"]  # the report, as `run` writes it
    chain = [line for line in out.stdout.splitlines() if line.startswith("j")]
    assert len(chain) == 9 and "--dependency=afterok:$j1 " in chain[1]
    for name, text in scripts.items():  # every script is valid bash
        check = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, (name, check.stderr)
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("force=[train]", "force= cannot be submitted"),
        ("round=1", "round= cannot be submitted"),
        ("-m", "is not supported"),
        ("hydra/launcher=submitit_slurm", "is a sweep option"),
        ("prompts.source=a\nb", "control character"),
        ("launcher.partition='gpu --wrap=x'", "launcher.partition: 'gpu --wrap=x' is not a plain SLURM name"),
        ("launcher.sbatch_options=['--mem=1G\nrm']", "launcher.sbatch_options"),
        ("launcher.train.shards=2", "launcher.train.shards: only generate, score and margin are sharded"),
        ("launcher.generate.time='1:00 ; x'", "launcher.generate.time"),
        ("launcher.nodes=2", "launcher.nodes"),  # a typo: not a key
        ("launcher.signal=USR1@120", "launcher.signal: 'USR1@120' is not B:USR1@SECONDS"),  # must go to the script
        ("launcher.signal=B:TERM@60", "launcher.signal: 'B:TERM@60'"),  # TERM is scancel's: not "requeue me"
    ],
)
def test_submit_refuses_what_it_cannot_pass_safely(tmp_path, override, message):
    out = run_cli("submit", "--dry-run", f"output_root={tmp_path}", override)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-1500:]
    assert "Traceback" not in out.stderr


def test_overrides_reach_the_job_as_typed_and_nothing_runs_in_the_shell(tmp_path):
    """The rendered script run by bash, with a stand-in python that prints its arguments (a mock of the
    interpreter in a test of the script rendering): hostile values arrive intact and execute nothing."""
    canary = tmp_path / "pwned"
    hostile = [f"prompts.source='$(touch {canary})'", "run_name='x; touch pwned'", "reward.function='a`id`:b'",
               """prompts.column="it's $HOME" """.strip()]
    out = run_cli("submit", "--dry-run", f"output_root={tmp_path}", "launcher.generate.shards=1", *hostile)
    # A quoted run_name may hold spaces and ';' for Hydra, but not in a path on an #SBATCH line: refused.
    assert out.returncode == 2 and "cannot hold it safely" in out.stderr
    out = run_cli("submit", "--dry-run", f"output_root={tmp_path}", "rounds=1", "launcher.generate.shards=1", *hostile[:1],
                  *hostile[2:])
    assert out.returncode == 0, out.stderr[-2000:]
    script = scripts_of(out.stdout)["r00-prompts-to-eval.sbatch"]
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/bash\nprintf "%s\\n" "$@" >> "$ARGS_OUT"\n')
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    script = script.replace("export SELFPLAY_PYTHON=", f"export SELFPLAY_PYTHON={fake_python} #")
    args_out = tmp_path / "args.txt"
    ran = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                         env={**os.environ, "ARGS_OUT": str(args_out)})
    assert ran.returncode == 0, ran.stderr
    received = args_out.read_text().splitlines()
    assert hostile[0] in received and hostile[2] in received and hostile[3] in received
    assert not canary.exists()


def test_resubmission_leaves_out_what_is_complete_and_retries_only_missing_shards(tmp_path, tiny_policy):
    overrides = [*tiny_overrides(tmp_path, tiny_policy, None, "resume"), "sampler.batch_size=1",
                 "sampler.sort_window_batches=2"]
    cfg = compose([*overrides, "launcher.generate.shards=3"])
    run_dir = tmp_path / "resume"
    pipeline.run_stage(cfg, run_dir, "prompts", 0)
    pipeline.run_stage(cfg, run_dir, "generate", 0, set(), 0, 3)
    pipeline.run_stage(cfg, run_dir, "generate", 0, set(), 2, 3)
    out = run_cli("submit", "--dry-run", *overrides, "launcher.generate.shards=3")
    assert out.returncode == 0, out.stderr[-2000:]
    scripts = scripts_of(out.stdout)
    assert next(iter(scripts)) == "r00-generate.sbatch"  # prompts is complete: no job for it
    assert "#SBATCH --array=1\n" in scripts["r00-generate.sbatch"]
    assert "#SBATCH --array=0-2\n" in scripts["r01-generate.sbatch"]  # later rounds: every shard
    assert "… 2/3 shards" in run_cli("status", str(run_dir)).stdout
    # A finished stage asked for with another config is refused at submit time, not in a job hours later.
    changed = run_cli("submit", "--dry-run", *overrides, "launcher.generate.shards=3", "prompts.per_round=5")
    assert changed.returncode == 2 and "round_00/prompts already finished with a different config" in changed.stderr


def test_a_run_continues_across_local_and_submit_with_what_it_ran(tmp_path, tiny_policy):
    """precision=auto and the default sampler.backend=vllm are settled on the machine at start-up; a command
    continuing a run keeps what its finished stages ran with, so local runs and `selfplay submit` (whose jobs may
    run elsewhere) continue each other without a refusal when nothing that runs differs."""
    import torch

    from selfplay.backends.precision import native_bf16
    from selfplay.runner.upgrade import keep_settled_values

    here = "bf16" if native_bf16(torch.device("cpu"))[0] else "fp32"  # what precision=auto becomes on this machine
    elsewhere = "fp32" if here == "bf16" else "bf16"
    typed = [o for o in tiny_overrides(tmp_path, tiny_policy, None, "mixed") if not o.startswith("precision=")]
    # A local run: auto settles to `here`; submit, on the same overrides, plans the rest instead of refusing.
    local = run_cli("stage", "prompts,generate", "round=0", *typed)
    assert local.returncode == 0, local.stderr[-2000:]
    out = run_cli("submit", "--dry-run", *typed)
    assert out.returncode == 0, out.stderr[-2000:]
    assert next(iter(scripts_of(out.stdout))).startswith("r00-score")
    # The reverse: a run whose stages ran on another machine (here: the other precision, as its job recorded it) is
    # continued locally on the same overrides: generate is complete, not refused.
    other = [o.replace("run_name=mixed", "run_name=elsewhere") for o in typed]
    job = run_cli("stage", "prompts,generate", "round=0", *other, f"precision={elsewhere}")
    assert job.returncode == 0, job.stderr[-2000:]
    again = run_cli("stage", "generate", "round=0", *other)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"keeping precision='{elsewhere}'" in again.stderr and "already finished" not in again.stderr
    # Typed on the command line, the option is not kept: the finished stage is refused, naming it.
    refused = run_cli("stage", "generate", "round=0", *other, f"precision={here}")
    assert refused.returncode == 2 and f"precision: '{elsewhere}' -> '{here}'" in refused.stderr
    # sampler.backend: a run that sampled with the hf fallback keeps it (and its batch size) where vLLM is installed.
    cfg = compose([o for o in typed if not o.startswith("sampler=")])
    assert cfg.sampler.backend == "vllm"
    pins = keep_settled_values(cfg, tmp_path / "mixed", ["model.path"])
    assert (cfg.sampler.backend, cfg.sampler.batch_size) == ("hf", 16) and "sampler.backend='hf'" in pins


def test_the_committed_multinode_example_is_what_submit_prints():
    """slurm/examples/llama8b_2node_dry_run.txt (linked from docs/slurm.md) stays true: its first line is the command."""
    import shlex

    from conftest import ROOT

    example = (ROOT / "slurm" / "examples" / "llama8b_2node_dry_run.txt").read_text()
    command = shlex.split(example.splitlines()[0].removeprefix("# selfplay "))
    out = run_cli(*command)
    assert out.returncode == 0, out.stderr[-2000:]
    body = example.split("\n\n", 1)[1]
    assert out.stdout == body
