"""The command line itself (selfplay/cli.py): `selfplay run|stage` composes its config once, keeps no state in the
module, never rewrites sys.argv, and Hydra's private API stays inside one function."""

from __future__ import annotations

import ast
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cli_env

import selfplay.cli as cli

CLI = ROOT / "selfplay" / "cli.py"

# Every composition Hydra makes (the compose API, hydra.main's runs and sweeps) goes through this one method.
COUNTING = """
import json, sys
from hydra._internal.config_loader_impl import ConfigLoaderImpl
calls = []
load = ConfigLoaderImpl.load_configuration
def counted(self, *args, **kwargs):
    calls.append(1)
    return load(self, *args, **kwargs)
ConfigLoaderImpl.load_configuration = counted
from selfplay.cli import main
sys.argv = ["selfplay-test", "untouched"]
results = []
for argv in json.loads(sys.argv_json):
    calls.clear()
    code = main(argv)
    results.append({"code": code, "compositions": len(calls), "argv": sys.argv})
print(json.dumps(results))
"""


def _counted(tmp_path: Path, *argvs: list[str]) -> list[dict]:
    script = COUNTING.replace("sys.argv_json", repr(json.dumps(argvs)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_stage_composes_its_config_once_and_runs_as_hydra_ran_it(tmp_path):
    overrides = ["round=0", f"output_root={tmp_path}", "run_name=once"]
    single, sweep = _counted(tmp_path, ["stage", "prompts", *overrides],
                             ["stage", "prompts", "-m", "round=0", "seed=1,2", f"output_root={tmp_path}",
                              "run_name=sweep"])
    assert single == {"code": 0, "compositions": 1, "argv": ["selfplay-test", "untouched"]}
    run_dir = tmp_path / "once"
    assert (run_dir / "round_00" / "prompts.done.json").is_file() and (run_dir / "selfplay.log").is_file()
    assert yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) == overrides
    hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert hydra["mode"] == "RUN" and hydra["runtime"]["output_dir"] == str(run_dir)
    assert hydra["overrides"]["hydra"] == ["hydra.mode=RUN"] and hydra["job"]["name"] == "selfplay"
    assert "round: 0" in (run_dir / ".hydra" / "config.yaml").read_text()
    # A sweep still goes through Hydra's command line, given the arguments rather than a rewritten sys.argv.
    assert sweep["code"] == 0 and sweep["argv"] == ["selfplay-test", "untouched"]
    assert sorted(json.loads((tmp_path / "sweep" / "sweep.json").read_text())) == ["seed=1", "seed=2"]
    assert all((tmp_path / "sweep" / d / "round_00" / "prompts.done.json").is_file() for d in ("seed=1", "seed=2"))


def test_a_config_that_fails_its_checks_is_composed_once_and_touches_nothing(tmp_path, monkeypatch, capsys):
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    calls = []
    load = ConfigLoaderImpl.load_configuration

    def counted(self, *args, **kwargs):
        calls.append(1)
        return load(self, *args, **kwargs)

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counted)
    monkeypatch.setattr(sys, "argv", ["selfplay-test", "untouched"])
    before = dict(vars(cli))
    assert cli.main(["stage", "generate", "round=0", f"output_root={tmp_path}", "sampler.n=1"]) == 2
    assert "sampler.n: needs ≥ 2 samples per prompt" in capsys.readouterr().err
    assert len(calls) == 1
    assert sys.argv == ["selfplay-test", "untouched"]
    assert list(tmp_path.iterdir()) == []  # refused before the run directory was made
    assert dict(vars(cli)) == before  # nothing in the module changed


def test_the_command_line_keeps_no_module_state():
    mutable = {name: type(value).__name__ for name, value in vars(cli).items()
               if not name.startswith("__") and isinstance(value, (dict, list, set, bytearray))}
    assert mutable == {}
    tree = ast.parse(CLI.read_text())
    assert not [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Global, ast.Nonlocal))]
    assert cli.Task.__dataclass_params__.frozen


def test_the_hydra_job_carries_its_task_and_pickles():
    """A launcher that runs the sweep's jobs elsewhere (submitit on SLURM) pickles the task function: the job runs the
    command it was given (`stage` too), with nothing read from module state."""
    job = pickle.loads(pickle.dumps(cli._job(cli.Task("stage", stages="score,pair"))))
    assert job.func is cli._app and job.args == (cli.Task("stage", stages="score,pair"),)
    assert job.__wrapped__ is cli._app and job.__module__ == "selfplay.cli"


def test_hydra_private_names_are_used_in_one_function():
    private: set[str] = set()
    for path in sorted((ROOT / "selfplay").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hydra._internal"):
                assert path == CLI, f"{path}:{node.lineno} imports {node.module}"
                private |= {a.asname or a.name for a in node.names}
    tree = ast.parse(CLI.read_text())
    users = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
             for n in ast.walk(f) if isinstance(n, ast.Name) and n.id in private}
    assert private and users == {"_through_hydra"}


@pytest.mark.parametrize("command", [["run"], ["stage", "train", "round=0"], ["submit", "--dry-run"]])
def test_a_removed_option_is_refused_with_what_replaced_it(command, tmp_path, capsys):
    from selfplay.cli import main

    assert main([*command, f"output_root={tmp_path}", "trainer.bf16=true"]) == 2
    assert "error: trainer.bf16: removed: precision=bf16" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
