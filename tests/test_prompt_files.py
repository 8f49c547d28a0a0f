"""User prompt files: every unusable input stops with one message naming the file and the row or column."""

import pandas as pd
import pytest
from omegaconf import OmegaConf

from selfplay.backends.prompt_sources import heldout_prompts, read_prompt_file, train_prompts
from selfplay.config import Config
from selfplay.errors import InputError


def write_jsonl(path, rows):
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return str(path)


def test_reads_jsonl_parquet_csv_and_keeps_extra_columns(tmp_path):
    rows = [{"instruction": f"Task {i}", "answer": str(i)} for i in range(5)]
    for suffix, write in ((".jsonl", lambda p: write_jsonl(p, rows)),
                          (".parquet", lambda p: pd.DataFrame(rows).to_parquet(p)),
                          (".csv", lambda p: pd.DataFrame(rows).to_csv(p, index=False))):
        path = tmp_path / f"prompts{suffix}"
        write(path)
        df = read_prompt_file(str(path), "instruction", None)
        assert df.columns.tolist() == ["prompt_id", "prompt", "answer"]
        assert df["prompt"].tolist() == [f"Task {i}" for i in range(5)]
        assert df["prompt_id"].is_unique


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        (None, {}, "does not exist"),
        ([], {}, "no rows"),
        ([{"text": "a"}], {}, "no column 'prompt'"),
        ([{"prompt": "a", "id": 1}, {"prompt": "b", "id": 1}], {"id_column": "id"}, "duplicate prompt id '1' (row 1)"),
        ([{"prompt": "a"}, {"prompt": "  "}], {}, "row 1 has an empty or non-text prompt"),
        ([{"prompt": "a"}], {"id_column": "uid"}, "no id column 'uid'"),
    ],
)
def test_bad_prompt_files_name_file_and_row(tmp_path, content, kwargs, message):
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text("" if content == [] else pd.DataFrame(content).to_json(orient="records", lines=True))
    with pytest.raises(InputError) as err:
        read_prompt_file(str(path), "prompt", kwargs.get("id_column"))
    assert str(path) in str(err.value) and message in str(err.value)


def test_not_utf8_and_unknown_type(tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("prompt\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(InputError, match="latin1.csv: cannot be read"):
        read_prompt_file(str(bad), "prompt", None)
    other = tmp_path / "p.txt"
    other.write_text("hello")
    with pytest.raises(InputError, match="unsupported type '.txt'"):
        read_prompt_file(str(other), "prompt", None)


def test_file_rounds_take_consecutive_rows_and_hold_out_the_tail(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"t{i}"} for i in range(10)])
    cfg = OmegaConf.structured(Config)
    cfg.prompts.source, cfg.prompts.per_round, cfg.prompts.eval_count = path, 3, 4
    assert train_prompts(cfg, 0)["prompt"].tolist() == ["t0", "t1", "t2"]
    assert train_prompts(cfg, 1)["prompt"].tolist() == ["t3", "t4", "t5"]
    assert train_prompts(cfg, 2)["prompt"].tolist() == ["t0", "t1", "t2"]  # wraps within the 6 training rows
    assert heldout_prompts(cfg)["prompt"].tolist() == ["t6", "t7", "t8", "t9"]
    cfg.prompts.eval_count = 10
    with pytest.raises(InputError, match="leave none for training"):
        train_prompts(cfg, 0)


def test_builtin_training_prompts_never_repeat_heldout_ones():
    cfg = OmegaConf.structured(Config)
    cfg.prompts.per_round, cfg.prompts.eval_count = 200, 200
    heldout = set(heldout_prompts(cfg)["prompt"])
    for r in range(3):
        rows = train_prompts(cfg, r)
        assert len(rows) == 200 and not heldout & set(rows["prompt"])
