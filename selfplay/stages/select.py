"""select — rank the round's pairs by a metric and keep the top k (or a ratio) of the pool.

Input:   round_XX/pairs.parquet (+ π_r for metric=real; + earlier rounds' selected.parquet with accumulate)
Output:  round_XX/selected.parquet   pairs' columns + metric, score, rank (1 = kept first), best first; for map also
         z_margin_explicit, z_abs_margin_implicit (z_margin_implicit when signed) and map_weight (z over the whole
         pool, so the score can be checked from the file alone); for real also real_similarity. Loads with
         `datasets.load_dataset("parquet", data_files=…)` and trains in TRL as-is (conversational columns).
         round_XX/README.md          a Hugging Face dataset card whose `configs` point at selected.parquet, so
         `datasets.load_dataset("round_XX")` (or the folder pushed to the Hub) loads exactly the selected pairs.
Metrics: map       z(Δex) − w·z(|Δim|)  (alignment potential, arXiv 2503.01864; z over the round's pool,
                   population std, std 0 → all zeros); selection.signed=true uses z(Δim) instead of z(|Δim|)
                   (a pair the policy orders the wrong way round then counts as unlearnt, not as learnt).
                   selection.weight=auto sets w per round from the pool (selfplay/core/selection.py: auto_weight).
         explicit  Δex (largest first)      implicit  −|Δim| (smallest |Δim| first)
         real      −cos(e_chosen, e_rejected): least similar responses first (REAL, arXiv 2409.17169); e is the
                   mean over response tokens of the policy's last hidden layer, or of selection.real_encoder's
         random    a seeded permutation     all       every pair (score Δex, for the ranking only)
Memory:  the pool is ranked on RANK_COLUMNS (ids, sample indices, Δex, Δim); the kept pairs' other columns, text
         included, are streamed into place window by window (`window_rows`), except for metric=real, which embeds
         the whole pool's text.
Alone:   selfplay stage select round=R
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from selfplay.backends.embeddings import pair_similarity
from selfplay.backends.logprob_scorer import pair_margins
from selfplay.config import round_seed
from selfplay.core.selection import PAIR_KEY, resolve_weight, select
from selfplay.rundir import atomic, tables
from selfplay.rundir.layout import round_name

log = logging.getLogger("selfplay")

OUTPUTS = ("selected.parquet", "README.md")
# The ranked pairs are written window by window: the size bounds memory, not what is kept.
UNKEYED = ("window_rows",)


def CONFIG(cfg) -> tuple[str, ...]:  # noqa: N802 — the runner reads CONFIG from every stage
    """metric=real and accumulate run π_r (and the reference) over the training tokens: those keys count too."""
    runs_policy = cfg.selection.metric == "real" or cfg.selection.accumulate
    return ("selection", "seed") + (("model.dtype", "model.reference", "trainer.objective", "trainer.mmpo_logits",
                                     "trainer.max_length", "margin", "precision")
                                    + (("trainer.beta",) if cfg.model.reference else ()) if runs_policy else ())


def requires(r: int, cfg=None) -> list[tuple[int, str]]:
    accumulate = cfg is not None and cfg.selection.accumulate and r > 0
    return [(r, "margin")] + ([(r - 1, "select")] if accumulate else [])


def select_pool(pairs: pd.DataFrame, cfg, seed: int, policy_path=None, device=None) -> pd.DataFrame:
    """`select` as the config says, computing REAL's similarities first when metric=real (policy_path: π_r)."""
    sel = cfg.selection
    if sel.metric == "real" and "real_similarity" not in pairs:
        pairs = pairs.assign(real_similarity=pair_similarity(pairs, cfg, policy_path, device))
    return select(pairs, sel.metric, sel.weight, sel.top_k, sel.ratio, seed=seed, signed=sel.signed)

# How the pair stage built each pair, by pair.strategy, for the dataset card.
PAIRING = {"best_worst": "the highest- and lowest-reward",
           "best_random": "the highest-reward and a seeded random lower-reward response",
           "best_mu2sigma": "the highest-reward response and the one nearest μ − 2σ of the rewards",
           "all": "two responses whose rewards differ, the higher one chosen, from every such pair"}


def dataset_card(ctx, selected: pd.DataFrame, pool: int) -> str:
    """HF dataset-card text: YAML header (what `datasets` reads) and how the pairs were made."""
    cfg = ctx.cfg
    sel = cfg.selection
    weight = f"{float(selected['map_weight'].iloc[0]):.3g}" if "map_weight" in selected and len(selected) else sel.weight
    term = "Δim" if sel.signed else "|Δim|"
    how = {"map": f"MAP alignment potential z(Δex) − {weight}·z({term}) (arXiv 2503.01864"
                  + (", w set by selection.weight=auto)" if sel.weight == "auto" else ")"),
           "real": "least similar chosen/rejected response embeddings (REAL, arXiv 2409.17169)",
           "explicit": "largest explicit (reward-model) margin", "implicit": "smallest |implicit margin|",
           "random": "a seeded random subset", "all": "no selection (every non-tie pair)"}[sel.metric]
    judge = cfg.reward.function if cfg.reward.backend == "function" else cfg.reward.model
    policy = cfg.model.path if ctx.round == 0 else f"{round_name(ctx.round - 1)}/policy of this run"
    return "\n".join([
        "---",
        "task_categories:", "- text-generation",
        "tags:", "- dpo", "- preference", "- self-play", "- selfplay",
        "size_categories:", "- n<1K" if len(selected) < 1000 else "- 1K<n<10K" if len(selected) < 10_000 else "- 10K<n<100K",
        "configs:", "- config_name: default", "  data_files:", "  - split: train", "    path: selected.parquet",
        "---", "",
        f"# selfplay round {ctx.round}: selected preference pairs", "",
        f"{len(selected)} preference pairs kept from a pool of {pool} by {how}. Each pair is {PAIRING[cfg.pair.strategy]} "
        f"of {cfg.sampler.n} responses sampled (T={cfg.sampler.temperature}, top-p {cfg.sampler.top_p}) "
        f"from the policy π_{ctx.round} ({policy}), judged by `{judge}`."
        + (f" A simulated noisy judge swapped chosen and rejected in a seeded {cfg.pair.flip_fraction:.0%} of the "
           "pool's pairs (`pair.flip_fraction`; column `label_flipped`)." if cfg.pair.flip_fraction else ""), "",
        "Columns: `prompt`, `chosen`, `rejected` in TRL's conversational preference format; `reward_chosen`, "
        "`reward_rejected`, `margin_explicit` (Δex), `margin_implicit` (Δim under π_r), the log-probabilities "
        "behind it, and `metric`, `score`, `rank` of the selection.", "",
        "```python", "from datasets import load_dataset", "",
        "pairs = load_dataset(\"path/to/round_dir\")[\"train\"]   # or a Hub repo holding this folder",
        "# trl.DPOTrainer(model=..., train_dataset=pairs, ...) applies the same chat template selfplay used", "```", "",
        "Made by selfplay's select stage; the run's `config.yaml` (one folder up) has every setting.", ""])


def accumulated(ctx) -> pd.DataFrame:
    """Earlier rounds' kept pairs (round r−1's selected.parquet holds its own predecessors), rescored under π_r:
    their log-probs become π_r's (the DPO reference of this round) and their Δim the current policy's."""
    earlier = ctx.read_parquet("selected.parquet", r=ctx.round - 1)
    if earlier.empty:
        return earlier
    # Prompt ids may repeat across rounds (a prompt file wraps around): key responses by round as well.
    keyed = earlier.assign(prompt_id=earlier["round"].astype(str) + "/" + earlier["prompt_id"].astype(str))
    rescored = pair_margins(keyed, ctx.cfg, ctx.policy_path(), ctx.device, f"round {ctx.round} earlier pairs")
    return rescored.assign(prompt_id=earlier["prompt_id"].to_numpy())


TEXT = tables.PAIR_TEXT  # read a window at a time
# What ranking reads of the whole pool (the pool's order, the two margins); every other column, text or narrow,
# travels with the text a window at a time (write_ranked), so a round's pool costs ~40 bytes a pair here.
RANK_COLUMNS = (*PAIR_KEY, "margin_explicit", "margin_implicit")


def run(ctx) -> None:
    """Rank the pool on the columns ranking needs, then write the kept pairs best first, streaming the rest."""
    sel = ctx.cfg.selection
    path = ctx.path("pairs.parquet")
    names = tables.column_names(path)
    rank_columns = [c for c in RANK_COLUMNS if c in names]
    if sel.metric == "real":  # REAL embeds the responses: the one metric that reads the pool's text whole
        pairs = tables.read_columns(path, names)
        narrow = pairs[rank_columns].assign(
            real_similarity=pair_similarity(pairs, ctx.cfg, ctx.policy_path(), ctx.device))
        del pairs
    else:
        narrow = tables.read_columns(path, rank_columns)
    pool = len(narrow)
    if sel.top_k is not None and sel.top_k > pool:
        # Ties (or dropped truncated pairs) left fewer pairs than asked for; a start-up check refuses a top_k
        # that no pool could meet.
        log.warning("round %d: selection.top_k=%d exceeds this round's pool of %d pairs (ties and truncated pairs are "
                    "dropped); keeping all of them", ctx.round, sel.top_k, pool)
    ranked = select_pool(narrow.assign(pool_row=np.arange(pool)), ctx.cfg, round_seed(ctx.cfg.seed, ctx.round))
    ranked["round"] = ctx.round
    columns = names + [c for c in ranked.columns if c not in names and c != "pool_row"]
    earlier = accumulated(ctx) if sel.accumulate and ctx.round > 0 else None
    write_ranked(path, ranked, ctx.out / "selected.parquet", columns, ctx.cfg.window_rows, earlier)
    card = ranked if earlier is None else pd.concat([ranked, earlier[[c for c in ranked if c in earlier]]])
    (ctx.out / "README.md").write_text(dataset_card(ctx, card, pool))
    kept_now = len(ranked)
    ctx.stats.update(pool=pool, selected=kept_now, metric=sel.metric,
                     short_of_top_k=max(sel.top_k - pool, 0) if sel.top_k is not None else 0,
                     mean_margin_explicit_selected=round(float(ranked["margin_explicit"].mean()), 4) if kept_now else None,
                     mean_abs_margin_implicit_selected=round(float(ranked["margin_implicit"].abs().mean()), 4) if kept_now else None)
    if sel.metric == "map" and pool:
        ctx.stats["map_weight"] = round(float(resolve_weight(narrow, sel.weight, sel.signed)), 4)
    if sel.accumulate:
        ctx.stats["training_pairs"] = kept_now + (len(earlier) if earlier is not None else 0)


def write_ranked(path: Path, ranked: pd.DataFrame, target: Path, columns: list[str], window_rows: int | None,
                 earlier: pd.DataFrame | None) -> None:
    """selected.parquet: the ranked pairs (with `pool_row`, their row in pairs.parquet) joined back to the pool's
    other columns (text included), in rank order, then `earlier` (accumulated pairs, whole frames). Two streaming
    passes, so no more than a window of the pool is held: the kept rows go to bucket files by rank range, then each
    bucket is sorted."""
    kept = len(ranked)
    step = window_rows or max(kept, 1)
    carried = [c for c in tables.column_names(path) if c not in ranked.columns]
    position = np.full(tables.count_rows(path), -1, dtype=np.int64)
    position[ranked["pool_row"].to_numpy()] = np.arange(kept)
    buckets = [atomic.temp_path(target.with_name(f"{target.name}.bucket-{b:05d}")) for b in range(-(-kept // step))]
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for lo, hi, frame in tables.iter_windows(path, tables.windows(len(position), step), columns=carried):
            pos = position[lo:hi]
            mine = pos >= 0
            rows = pa.Table.from_pandas(frame[mine].assign(rank_position=pos[mine]), preserve_index=False)
            bucket_of = pos[mine] // step
            for b in map(int, np.unique(bucket_of)):
                part = rows.filter(pa.array(bucket_of == b))
                if b not in writers:
                    writers[b] = pq.ParquetWriter(buckets[b], part.schema)
                writers[b].write_table(part)
        for writer in writers.values():
            writer.close()
        ranked = ranked.drop(columns="pool_row")
        # An empty pool still gets every column, each of its pairs.parquet type.
        empty = pd.concat([ranked.iloc[:0].reset_index(drop=True), tables.read_rows(path, 0, 0, carried)], axis=1)
        with tables.TableWriter(target, empty=empty[columns]) as out:
            for b, bucket in enumerate(buckets):
                pool = pq.read_table(bucket).to_pandas().sort_values("rank_position")
                rows = ranked.iloc[b * step:(b + 1) * step].reset_index(drop=True)
                out.write(rows.assign(**{c: pool[c].to_numpy() for c in carried})[columns])
                bucket.unlink()
            if earlier is not None and len(earlier):
                out.write(earlier.reindex(columns=columns))
    finally:
        for writer in writers.values():
            writer.close()
        for bucket in buckets:
            bucket.unlink(missing_ok=True)
