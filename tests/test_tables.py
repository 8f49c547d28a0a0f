"""The streaming table layer (selfplay/rundir/tables.py) and the stages' results through it: windows of whole prompts,
reads that touch only their row groups, writes that are complete or absent, and pair/select giving the whole-table
result whatever the window."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from selfplay.config import Config
from selfplay.errors import InputError
from selfplay.rundir import tables
from selfplay.stages import pair, select


def scores_frame(n_prompts: int = 23, n: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [{"prompt_id": f"p{i:04d}", "prompt": f"question {i}", "sample_idx": j, "response": f"answer {i}.{j}",
             "reward": float(rng.integers(0, 4))} for i in range(n_prompts) for j in range(n)]
    return pd.DataFrame(rows)


def write_parts(frame: pd.DataFrame, directory, sizes: list[int]) -> None:
    directory.mkdir()
    start = 0
    for i, size in enumerate(sizes):
        frame.iloc[start:start + size].to_parquet(directory / f"part-{i:05d}.parquet", index=False, row_group_size=4)
        start += size
    assert start == len(frame)


def test_windows_never_split_a_prompt_and_reads_cross_files_and_row_groups(tmp_path):
    frame = scores_frame()
    write_parts(frame, tmp_path / "scores", [10, 1, 30, 28])  # part and row-group edges mid-prompt
    path = tmp_path / "scores"
    assert tables.count_rows(path) == len(frame)
    codes = tables.key_codes(path)
    assert (codes == pd.factorize(frame["prompt_id"])[0]).all()  # one code per id, across files
    for rows in (1, 4, 7, 100, None):
        spans = tables.group_windows(codes, rows)
        assert spans[0][0] == 0 and spans[-1][1] == len(frame)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        for lo, hi, window in tables.iter_windows(path, spans):
            pd.testing.assert_frame_equal(window, frame.iloc[lo:hi].reset_index(drop=True))
            assert lo == 0 or frame["prompt_id"].iloc[lo] != frame["prompt_id"].iloc[lo - 1]
    assert tables.read_rows(path, 9, 12, ["reward"])["reward"].tolist() == frame["reward"].iloc[9:12].tolist()
    assert tables.read_rows(path, 5, 5).columns.tolist() == frame.columns.tolist()


def test_reading_window_by_window_holds_no_more_arrow_memory_as_the_parts_add_up(tmp_path):
    # An open pyarrow ParquetFile keeps about a row group of buffers after a read: a reader that held every part
    # open grew with the round (the 1M-prompt benchmark found it). Arrow's allocation counter is exact, so the
    # bound here is about one part's text, not timing or RSS.
    rng = np.random.default_rng(0)
    row_chars = 2000  # distinct text a row (no dictionary encoding): one part is ~1 MB
    directory = tmp_path / "scores"
    directory.mkdir()
    for i in range(40):
        texts = [rng.bytes(row_chars // 2).hex() for _ in range(500)]
        pd.DataFrame({"prompt_id": [f"p{i:03d}-{j:03d}" for j in range(500)], "response": texts}).to_parquet(
            directory / f"part-{i:05d}.parquet", index=False)
    held = []
    for _, _, window in tables.iter_windows(directory, tables.windows(tables.count_rows(directory), 500)):
        assert len(window) == 500
        del window
        held.append(pa.total_allocated_bytes())
    part_bytes = 500 * row_chars
    assert max(held) < 3 * part_bytes, f"arrow memory held while reading grew to {max(held):,} bytes"


def test_the_heap_is_trimmed_between_windows(tmp_path, monkeypatch):
    # glibc keeps a window's freed fragments mapped; margin's resident memory crept ~5 MB a window at 1M prompts
    # until the heap was handed back between windows (the benchmark in bench/results/data_rss_cpu.md shows it).
    # The effect is measured there; here: it runs between windows, not before the first, and glibc has it.
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert tables._malloc_trim() is not None
    frame = scores_frame()
    write_parts(frame, tmp_path / "scores", [len(frame)])
    calls, seen = [], []
    monkeypatch.setattr(tables, "release_freed_memory", lambda: calls.append(len(seen)))
    spans = tables.group_windows(tables.key_codes(tmp_path / "scores"), 20)
    for _, _, window in tables.iter_windows(tmp_path / "scores", spans):
        seen.append(len(window))
    assert len(spans) > 2 and calls == list(range(1, len(spans)))


def test_a_prompt_whose_rows_are_apart_is_refused_naming_the_file(tmp_path):
    frame = scores_frame(4, 2)
    frame.iloc[[1, 2]] = frame.iloc[[2, 1]].to_numpy()
    frame.to_parquet(tmp_path / "scores.parquet", index=False)
    with pytest.raises(InputError, match="scores.parquet: the rows of one prompt_id are not adjacent"):
        tables.check_contiguous(tables.key_codes(tmp_path / "scores.parquet"), tmp_path / "scores.parquet")


def test_table_writer_publishes_whole_tables_only(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError), tables.TableWriter(target) as out:
        out.write(pd.DataFrame({"a": [1, 2]}))
        raise RuntimeError("killed mid-table")
    assert not target.exists() and not list(tmp_path.iterdir())  # no output, no temp file
    with tables.TableWriter(target, empty=pd.DataFrame({"a": pd.Series(dtype="int64")})) as out:
        out.write(pd.DataFrame({"a": pd.Series(dtype="int64")}))
    assert pd.read_parquet(target).columns.tolist() == ["a"] and len(pd.read_parquet(target)) == 0
    with tables.TableWriter(target) as out:
        for lo in range(0, 40_000, 10_000):
            out.write(pd.DataFrame({"a": np.arange(lo, lo + 10_000)}))
    meta = pq.ParquetFile(target).metadata
    assert meta.num_rows == 40_000 and max(meta.row_group(g).num_rows for g in range(meta.num_row_groups)) <= tables.ROW_GROUP_ROWS
    assert pd.read_parquet(target)["a"].tolist() == list(range(40_000))


class FakeCtx:
    """Stands in for StageContext in these unit tests of pair.run and select.run: a config, paths and stats."""

    def __init__(self, cfg, rdir, out):
        self.cfg, self.round, self.out, self.stats, self._rdir = cfg, 0, out, {}, rdir

    def path(self, name, r=None):
        return self._rdir / name

    def policy_path(self, r=None):
        return None

    device = None


@pytest.mark.parametrize("strategy", ["all", "best_worst", "best_random", "best_mu2sigma"])
@pytest.mark.parametrize("metric", ["map", "random", "explicit"])
def test_pair_and_select_give_the_whole_table_result_for_any_window(tmp_path, monkeypatch, strategy, metric):
    frame = scores_frame(41, 4)
    results = {}
    read_whole = []  # spy on what select reads of the whole pool: only the ranking columns, never text
    real_read_columns = tables.read_columns
    monkeypatch.setattr(tables, "read_columns", lambda path, columns: read_whole.append(list(columns))
                        or real_read_columns(path, columns))
    for rows in (None, 5, 9):
        rdir = tmp_path / f"w{rows}"
        rdir.mkdir()
        write_parts(frame, rdir / "scores", [50, 60, 54])
        cfg = OmegaConf.structured(Config)
        cfg.window_rows, cfg.pair.strategy, cfg.selection.metric, cfg.selection.ratio = rows, strategy, metric, 0.3
        ctx = FakeCtx(cfg, rdir, rdir)
        pair.run(ctx)
        pairs = pd.read_parquet(rdir / "candidate_pairs.parquet")
        # margin's columns, made up here: select reads only the table
        pairs["margin_implicit"] = np.sin(np.arange(len(pairs)))
        pairs.to_parquet(rdir / "pairs.parquet", index=False, row_group_size=7)
        read_whole.clear()
        select.run(ctx)
        assert read_whole == [list(select.RANK_COLUMNS)]
        results[rows] = (pairs, pd.read_parquet(rdir / "selected.parquet"), dict(ctx.stats))
    whole_pairs, whole_selected, whole_stats = results[None]
    assert len(whole_selected) == int(np.ceil(0.3 * len(whole_pairs))) > 0
    assert whole_selected["rank"].tolist() == list(range(1, len(whole_selected) + 1))
    for rows in (5, 9):
        pd.testing.assert_frame_equal(results[rows][0], whole_pairs, check_exact=True)
        pd.testing.assert_frame_equal(results[rows][1], whole_selected, check_exact=True)
        assert results[rows][2] == whole_stats
    # Every column of the pool came back with its own pair, in the pool's types.
    key = ["prompt_id", "chosen_sample_idx", "rejected_sample_idx"]
    joined = whole_selected[list(whole_pairs.columns)].merge(whole_pairs, on=key, suffixes=("", "_pool"))
    assert len(joined) == len(whole_selected)
    for c in whole_pairs.columns.difference(key):
        assert joined[c].tolist() == joined[f"{c}_pool"].tolist(), c
    assert (whole_selected.dtypes[whole_pairs.columns] == whole_pairs.dtypes).all()
    # The text came back with its own pair: chosen's text is the chosen sample's response.
    by_key = frame.set_index(["prompt_id", "sample_idx"])["response"]
    assert all(row["chosen"][0]["content"] == by_key[(row["prompt_id"], row["chosen_sample_idx"])]
               for _, row in whole_selected.iterrows())


def test_a_noisy_judge_swaps_a_seeded_fraction_of_pairs_the_same_for_any_window(tmp_path):
    """pair.flip_fraction: the same pairs as without it, a seeded ~30% of them with chosen and rejected swapped (and
    their sample indices), the judge's rewards and margin as they were; the same flips for any window size."""
    frame = scores_frame(41, 4)
    by_key = frame.set_index(["prompt_id", "sample_idx"])["response"]
    results = {}
    for fraction, rows in ((0.0, None), (0.3, None), (0.3, 5), (0.3, 9)):
        rdir = tmp_path / f"f{fraction}-w{rows}"
        rdir.mkdir()
        write_parts(frame, rdir / "scores", [50, 60, 54])
        cfg = OmegaConf.structured(Config)
        cfg.window_rows, cfg.pair.strategy, cfg.pair.flip_fraction = rows, "all", fraction
        ctx = FakeCtx(cfg, rdir, rdir)
        pair.run(ctx)
        results[fraction, rows] = (pd.read_parquet(rdir / "candidate_pairs.parquet"), dict(ctx.stats))
    clean, noisy = results[0.0, None][0], results[0.3, None][0]
    assert "label_flipped" not in clean  # off: the table is what it always was
    flipped = noisy["label_flipped"].to_numpy()
    assert 0.15 < flipped.mean() < 0.45 and results[0.3, None][1]["labels_flipped"] == int(flipped.sum())
    same = ["prompt_id", "reward_chosen", "reward_rejected", "margin_explicit"]
    pd.testing.assert_frame_equal(noisy[same], clean[same])
    for a, b in (("chosen", "rejected"), ("chosen_sample_idx", "rejected_sample_idx")):
        assert noisy[a].tolist() == np.where(flipped, clean[b], clean[a]).tolist()
    assert all(row["chosen"][0]["content"] == by_key[(row["prompt_id"], row["chosen_sample_idx"])]
               for _, row in noisy.iterrows())
    for rows in (5, 9):
        pd.testing.assert_frame_equal(results[0.3, rows][0], noisy, check_exact=True)

