"""The bad-input table (docs/reliability.md), one test per row: each input makes the real `selfplay` command stop with the
row's message on stderr, exit 2 (no traceback), and leave no half-written output. Inputs that can be checked before
any work (prompt files, model directories, config) stop before a round directory exists."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, run_cli, tiny_overrides
from test_faults import partial_files

LONG_PROMPT = "Explain, in detail and with examples, " * 10


@dataclass
class Case:
    id: str
    message: str  # what the bad-input table shows, and the test looks for in stderr
    command: str = "run"
    before_work: bool = False  # stopped before any round directory was made
    exit_code: int = 2
    files: dict = field(default_factory=dict)  # name → rows (list of dicts), bytes, or None for an empty file
    overrides: list = field(default_factory=list)  # {dir} is the test's tmp dir
    model_without: tuple = ()  # files removed from a copy of the tiny policy used as model.path
    model_edit: str | None = None  # a damage done to that copy: truncate_weights | config_other_size | config_not_json
    args: list = field(default_factory=list)  # positional arguments after the command ({dir}: the tmp dir)
    hydra_overrides: bool = True  # false: report/status, which take a directory and no config
    no_run_dir: bool = False  # refused before even the run directory was made (config checks, run lock)


CASES = [
    Case("prompt_file_missing", "does not exist", before_work=True, overrides=["prompts.source={dir}/nope.jsonl"]),
    Case("prompt_file_empty", "no rows", before_work=True, files={"p.jsonl": None},
         overrides=["prompts.source={dir}/p.jsonl"]),
    Case("prompt_file_not_utf8", "cannot be read", before_work=True,
         files={"p.csv": "prompt\ncaf\xe9 au lait\n".encode("latin-1")}, overrides=["prompts.source={dir}/p.csv"]),
    Case("prompt_column_missing", "no column 'prompt'", before_work=True,
         files={"p.jsonl": [{"text": f"t{i}"} for i in range(12)]}, overrides=["prompts.source={dir}/p.jsonl"]),
    Case("prompt_ids_duplicate", "duplicate prompt id '3' (row 4)", before_work=True,
         files={"p.jsonl": [{"prompt": f"t{i}", "id": min(i, 3)} for i in range(12)]},
         overrides=["prompts.source={dir}/p.jsonl", "prompts.id_column=id"]),
    Case("prompt_empty", "row 2 has an empty or non-text prompt", before_work=True,
         files={"p.jsonl": [{"prompt": " " if i == 2 else f"Say {i}"} for i in range(12)]},
         overrides=["prompts.source={dir}/p.jsonl"]),
    Case("prompt_empty_skipped", "skipped 1 empty and 0 over-long prompts", command="stage prompts", exit_code=0,
         files={"p.jsonl": [{"prompt": " " if i == 2 else f"Say {i}"} for i in range(12)]},
         overrides=["prompts.source={dir}/p.jsonl", "prompts.invalid=skip", "round=0"]),
    Case("prompt_overlong", "row 5 has 111 tokens, over prompts.max_prompt_tokens=64", before_work=True,
         files={"p.jsonl": [{"prompt": LONG_PROMPT if i == 5 else f"Say {i}"} for i in range(12)]},
         overrides=["prompts.source={dir}/p.jsonl", "prompts.max_prompt_tokens=64"]),
    Case("prompt_overlong_skipped", "skipped 0 empty and 1 over-long prompts", command="stage prompts", exit_code=0,
         files={"p.jsonl": [{"prompt": LONG_PROMPT if i == 5 else f"Say {i}"} for i in range(12)]},
         overrides=["prompts.source={dir}/p.jsonl", "prompts.max_prompt_tokens=64", "prompts.invalid=skip", "round=0"]),
    Case("reward_nan", "returned nan for prompt_id=", overrides=["reward.function=rewards_for_tests:not_finite"]),
    Case("reward_inf", "returned inf for prompt_id=", overrides=["reward.function=rewards_for_tests:infinite"]),
    Case("reward_wrong_shape", "returned shape (17,) for 18 responses",
         overrides=["reward.function=rewards_for_tests:wrong_length"]),
    Case("reward_function_missing", "reward.function: 'rewards_for_tests' has no function 'nope'", before_work=True,
         overrides=["reward.function=rewards_for_tests:nope"]),
    Case("all_ties", "no preference pairs to train on", overrides=["reward.function=rewards_for_tests:constant"]),
    Case("model_without_weights", "has no *.safetensors weights", before_work=True,
         model_without=("model.safetensors",)),
    Case("model_without_tokenizer", "has no tokenizer", before_work=True,
         model_without=("tokenizer.json", "tokenizer_config.json")),
    Case("model_without_chat_template", "has no chat template", before_work=True,
         model_without=("chat_template.jinja",)),
    Case("unknown_config_key", "Key 'betta' not in 'TrainerConfig'", before_work=True, exit_code=1,  # Hydra's exit
         overrides=["trainer.betta=1"]),
    Case("top_k_over_pool", "selection.top_k: 100 is larger than the pool can be", before_work=True,
         overrides=["selection.top_k=100"]),
    Case("run_name_outside_output_root", "run_name: must be a plain directory name", before_work=True,
         overrides=["run_name=../elsewhere"]),
    # Options a library used to check late (after generation, with its traceback): now each has its range declared
    # beside its field (selfplay/config.py `option`) and is checked before the run directory exists.
    Case("option_gradient_accumulation_zero", "trainer.gradient_accumulation_steps: must be ≥ 1, got 0",
         before_work=True, no_run_dir=True, overrides=["trainer.gradient_accumulation_steps=0"]),
    Case("option_scheduler_unknown", "trainer.lr_scheduler_type: must be one of ('linear', 'cosine'",
         before_work=True, no_run_dir=True, overrides=["trainer.lr_scheduler_type=bogus"]),
    Case("option_warmup_negative", "trainer.warmup_ratio: must be in [0, 1), got -0.5", before_work=True,
         no_run_dir=True, overrides=["trainer.warmup_ratio=-0.5"]),
    Case("option_eval_batch_zero", "eval.batch_size: must be ≥ 1, got 0", before_work=True, no_run_dir=True,
         overrides=["eval.batch_size=0"]),
    Case("sweep_job_invalid", "sweep job trainer.warmup_ratio=-0.5", command="run -m", before_work=True,
         no_run_dir=True, overrides=["trainer.warmup_ratio=0.1,-0.5"]),
    Case("train_changed_nothing", "the trained policy equals π_0 in every weight", model_edit="no_exact_zeros",
         overrides=["trainer.learning_rate=1e-30"]),
    Case("weights_truncated", "is not a readable safetensors file", before_work=True, no_run_dir=True,
         model_edit="truncate_weights"),
    Case("weights_other_model", "the weights and config.json are from different models", before_work=True,
         no_run_dir=True, model_edit="config_other_size"),
    Case("config_json_invalid", "config.json is not valid JSON", before_work=True, no_run_dir=True,
         model_edit="config_not_json"),
    Case("reward_returns_none", "returned NoneType None; it must return a list of",
         overrides=["reward.function=rewards_for_tests:returns_none"]),
    Case("reward_returns_scalar", "returned float 0.5; it must return a list of",
         overrides=["reward.function=rewards_for_tests:returns_scalar"]),
    Case("reward_raises", "on the batch of rows 0–17 (first: prompt_id=",
         overrides=["reward.function=rewards_for_tests:raises"]),
    Case("reward_needs_column", "needs the column(s) ['constraints'], which the rows do not have",
         files={"p.jsonl": [{"prompt": f"Say {i}"} for i in range(12)]},
         overrides=["prompts.source={dir}/p.jsonl", "reward.function=selfplay.rewards.ifeval:reward"]),
    Case("select_half_score_columns", "has column 'score_chosen' but not 'score_rejected'", command="select",
         args=["{dir}/pairs.jsonl", "{dir}/kept.parquet"],
         files={"pairs.jsonl": [{"prompt": f"p{i}", "chosen": "a", "rejected": "b", "score_chosen": 1.0}
                                for i in range(4)]}),
    Case("prompt_file_is_directory", "is a directory; give one .parquet, .jsonl, .json or .csv file",
         before_work=True, no_run_dir=True, overrides=["prompts.source={dir}"]),
    Case("prompt_jsonl_broken_line", "line 3 is not valid JSON", before_work=True, no_run_dir=True,
         files={"p.jsonl": b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n'}, overrides=["prompts.source={dir}/p.jsonl"]),
    Case("prompt_chat_messages", "row 1 holds chat messages (a list of role/content dicts), not text",
         before_work=True, no_run_dir=True,
         files={"p.jsonl": [{"prompt": "Say hi" if i != 1 else [{"role": "user", "content": "hi"}]}
                            for i in range(12)]}, overrides=["prompts.source={dir}/p.jsonl"]),
    Case("report_foreign_directory", "is not a selfplay run directory (no config.yaml or round_XX/ in it); nothing "
         "written", command="report", args=["{dir}/elsewhere"], hydra_overrides=False,
         files={"elsewhere/notes.md": b"mine"}),
    Case("status_foreign_directory", "is not a selfplay run, sweep or comparison directory", command="status",
         args=["{dir}/elsewhere"], hydra_overrides=False, files={"elsewhere/notes.md": b"mine"}),
]


def _damage(model: Path, edit: str) -> None:
    if edit == "truncate_weights":  # the header survives; the tensors' bytes do not
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: 1 << 20])
    elif edit == "config_other_size":  # a config.json from a wider model of the same family
        config = json.loads((model / "config.json").read_text())
        config["intermediate_size"] *= 2
        (model / "config.json").write_text(json.dumps(config))
    elif edit == "no_exact_zeros":  # lr 1e-30 then moves no weight: each is far above its update's ulp
        from safetensors.torch import load_file, save_file

        tensors = load_file(model / "model.safetensors")
        save_file({k: t.masked_fill(t == 0, 0.01) for k, t in tensors.items()}, model / "model.safetensors",
                  metadata={"format": "pt"})
    elif edit == "config_not_json":
        (model / "config.json").write_text('{"model_type": "llama",')
    else:
        raise ValueError(edit)


def _materialise(case: Case, tmp_path: Path, tiny_policy: Path) -> list[str]:
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.write_text("")
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(pd.DataFrame(content).to_json(orient="records", lines=True))
    overrides = tiny_overrides(tmp_path, tiny_policy, None, run_name="bad") + ["rounds=1"]
    if case.model_without or case.model_edit:
        model = tmp_path / "model"
        shutil.copytree(tiny_policy, model)
        for name in case.model_without:
            (model / name).unlink()
        if case.model_edit:
            _damage(model, case.model_edit)
        overrides.append(f"model.path={model}")
    return overrides + [o.format(dir=tmp_path) for o in case.overrides]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, tiny_policy):
    overrides = _materialise(case, tmp_path, tiny_policy)
    command = case.command.split()
    if command[0] == "stage":
        overrides = [o for o in overrides if not o.startswith("rounds=")]
    if not case.hydra_overrides:
        overrides = []
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = run_cli(*command, *[a.format(dir=tmp_path) for a in case.args], *overrides, timeout=600)
    assert proc.returncode == case.exit_code, proc.stderr[-3000:]  # 2: selfplay's errors; 1: Hydra's own
    assert case.message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    run_dir = tmp_path / "bad"
    if case.before_work:
        assert not list(tmp_path.glob("**/round_*")), "work started before the input was checked"
    if case.no_run_dir or not case.hydra_overrides:
        assert not run_dir.exists(), "the run directory was made before the input was checked"
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "a refused command wrote"
    if run_dir.is_dir():
        assert partial_files(run_dir) == []
        assert not list(run_dir.glob("round_*/.tmp-*")), "a failed stage left its temp directory"
    if case.exit_code == 0:  # skipped, and counted in the stage's manifest
        stats = json.loads((run_dir / "round_00" / "prompts.done.json").read_text())["stats"]
        kind = "skipped_empty" if "empty" in case.id else "skipped_overlong"
        assert stats[kind] == 1 and stats["rows"] == 6


def test_damaged_stage_output_is_refused_before_it_is_read(tmp_path, tiny_policy):
    overrides = tiny_overrides(tmp_path, tiny_policy, None, run_name="bad")
    assert run_cli("stage", "prompts,generate,score", "round=0", *overrides).returncode == 0
    scores = next((tmp_path / "bad" / "round_00" / "scores").glob("*.parquet"))
    data = bytearray(scores.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    scores.write_bytes(bytes(data))
    proc = run_cli("stage", "pair", "round=0", *overrides)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{scores} does not match round_00/score.done.json (sha256 differs)" in proc.stderr
    assert "force=[score]" in proc.stderr
    assert not (tmp_path / "bad" / "round_00" / "pair.done.json").exists()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_during_a_write_is_one_message_and_the_rerun_continues(tmp_path, tiny_policy):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "4m"):
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root and must be able to mount a small tmpfs for the disk-full test")
        pytest.skip("needs root to mount a 4 MB tmpfs")
    try:
        # 4 MB holds the data stages' files but not the trained policy (~13 MB): the train stage's write fails.
        overrides = tiny_overrides(small, tiny_policy, None, run_name="full") + ["rounds=1"]
        proc = run_cli("run", *overrides)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert re.search(r"disk full while writing under \S+full \(.*\); free space there", proc.stderr), proc.stderr[-2000:]
        rdir = small / "full" / "round_00"
        assert (rdir / "select.done.json").exists() and not (rdir / "train.done.json").exists()
        assert not (rdir / "policy").exists() and not (rdir / ".tmp-train").exists()
        assert partial_files(small / "full") == []
        subprocess.run(["mount", "-o", "remount,size=256m", str(small)], check=True)
        resumed = run_cli("run", *overrides)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "round 0 select   skipped (complete)" in resumed.stderr
        assert (rdir / "train.done.json").exists()
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_run_directories_follow_the_users_umask(tmp_path, tiny_policy):
    overrides = tiny_overrides(tmp_path, tiny_policy, None, run_name="umask")
    proc = subprocess.run(["bash", "-c", 'umask 027 && exec "$0" -m selfplay.cli "$@"', sys.executable, "stage",
                           "prompts", "round=0", *overrides], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rdir = tmp_path / "umask" / "round_00"
    assert (rdir.stat().st_mode & 0o777) == 0o750
    assert ((rdir / "prompts.parquet").stat().st_mode & 0o777) == 0o640


def test_readme_table_is_this_file():
    """Every row of docs/reliability.md's bad-input table names a case here with the same message, and every case has a row."""
    readme = (ROOT / "docs" / "reliability.md").read_text()
    rows = re.findall(r"^\| (.+?) \| `(.+?)` \| `(\w+)` \|$", readme, flags=re.M)
    table = {case_id: message for _, message, case_id in rows}
    cases = {c.id: c.message for c in CASES}
    cases.update(damaged_stage_output="does not match round_00/score.done.json (sha256 differs)",
                 disk_full="disk full while writing under", run_dir_permissions="(none: the user's umask applies)",
                 # tests/test_run_lock.py
                 run_locked="is being written by another selfplay process: pid ",
                 interrupted="interrupted; re-run the same command to resume (finished stages are kept)",
                 report_unfinished="is not finished",
                 sweep_names="(none: one directory per job, named by the swept keys only)")
    assert table == cases
