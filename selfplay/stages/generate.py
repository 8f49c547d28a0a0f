"""generate — N candidate responses per prompt from the round's policy π_r.

Input:   round_XX/prompts.parquet; π_r (round 0: model.path, else round_{r-1}/policy)
Output:  round_XX/generations/part-*.parquet (one part per shard, in prompt-file order, written window by window)
         prompt_id, prompt, sample_idx, response, n_tokens, finish_reason (+ the prompt file's other columns)
Alone:   selfplay stage generate round=R [shard=i num_shards=n]   (see selfplay/rundir/shards.py)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from selfplay.backends.chat import template_sha256
from selfplay.backends.modeling import load_tokenizer
from selfplay.backends.samplers import SamplingSpec, build_sampler, completions_frame
from selfplay.config import round_seed
from selfplay.rundir import faults, preemption, shards
from selfplay.rundir.checkpoints import ChunkStore
from selfplay.rundir.shards import shard_span

log = logging.getLogger("selfplay")

OUTPUTS = ("generations",)
# Everything that decides the responses. Left out on purpose: how many engines share the work and how much memory
# each gets (sampler.num_engines, gpu_memory_utilization, cpu_kv_cache_gb, enforce_eager) — a run resumed on
# another allocation keeps its finished rounds.
CONFIG = ("model.dtype", "model.trust_remote_code", "seed", "sampler.backend", "sampler.n", "sampler.temperature",
          "sampler.top_p", "sampler.max_new_tokens", "sampler.batch_size", "sampler.sort_window_batches",
          "sampler.tensor_parallel_size", "sampler.max_model_len", "sampler.max_num_batched_tokens",
          "sampler.overlong_prompts", "precision")


def requires(r: int, cfg=None) -> list[tuple[int, str]]:
    return [(r, "prompts")] + ([(r - 1, "train")] if r > 0 else [])


def compute(ctx, shard: int, num_shards: int) -> Iterator[pd.DataFrame]:
    """The completions of this shard's windows of `sampler.sort_window_batches` × `batch_size` prompts (hf sorts by
    length inside a window; vllm runs chunks of `batch_size` prompts), so any shard count gives the same batches.
    Yields them window by window, as the part file takes them; each window is checkpointed when it finishes, and a
    resumed attempt (any shard count) reads back the windows done instead of generating them."""
    cfg = ctx.cfg
    s = cfg.sampler
    prompts = ctx.read_parquet("prompts.parquet")
    window = s.batch_size * s.sort_window_batches
    lo, hi = shard_span(len(prompts), window, shard, num_shards)
    windows = range(lo // window, -(-hi // window))
    store = ChunkStore(ctx.checkpoint_dir, faults.stage_label(ctx.round_dir.name, "generate", "window"))
    done = [w for w in windows if store.has(w)]
    label = f"round {ctx.round} generate" + (f" {shard}/{num_shards}" if num_shards > 1 else "")
    if done:
        log.info("%s: %d of %d windows were checkpointed by an earlier attempt", label, len(done), len(windows))
    stats: list[dict] = []
    yield completions_frame(prompts.iloc[:0], [])  # the columns, should the shard have no window
    with contextlib.ExitStack() as stack:
        stack.enter_context(preemption.safe_points())  # a stop signal waits for the window in hand to be saved
        sampler = None
        for w in windows:
            chunk = store.load(w)
            if chunk is None:
                # every earlier window of the shard was read back or saved: all are checkpointed
                preemption.check(f"{label}: {w - windows.start} of {len(windows)} windows checkpointed")
                if sampler is None:  # started only when some window is not checkpointed
                    sampler = stack.enter_context(build_sampler(cfg, ctx.policy_path(), ctx.device))
                rows = prompts.iloc[w * window:min((w + 1) * window, hi)].reset_index(drop=True)
                spec = SamplingSpec(n=s.n, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                    seed=round_seed(cfg.seed, ctx.round), batch_size=s.batch_size,
                                    first_batch=w * s.sort_window_batches, sort_window=window)
                skipped, started = sampler.skipped_overlong, time.time()
                completions = sampler(list(rows["prompt"]), spec, keys=[str(k) for k in rows["prompt_id"]],
                                               desc=label + (f" window {w + 1}/{len(windows)}" if len(windows) > 1 else ""))
                chunk = (completions_frame(rows, completions),
                         dict(prompts=len(rows), skipped_overlong_prompts=sampler.skipped_overlong - skipped,
                              generation_s=round(time.time() - started, 2),
                              chat_template_sha256=template_sha256(sampler.tokenizer)))
                store.save(w, *chunk)
            stats.append(chunk[1])
            yield chunk[0]
        engine_start_s = sampler.timings.get("engine_start_s", 0.0) if sampler is not None else 0.0
    # what served the sampling (started, weights loaded in place, or kept), with the weights probe's figures
    ctx.stats["engines"] = list(getattr(sampler, "served", []))
    ctx.stats.update(prompts=hi - lo, skipped_overlong_prompts=sum(st["skipped_overlong_prompts"] for st in stats),
                     generation_s=round(sum(st["generation_s"] for st in stats), 2), engine_start_s=engine_start_s,
                     chat_template_sha256=stats[0]["chat_template_sha256"] if stats
                     else template_sha256(load_tokenizer(ctx.policy_path(), cfg.model.trust_remote_code)))


def merge(ctx, parts: list[Path], part_stats: list[dict]) -> None:
    """The parts become generations/part-XXXXX.parquet in shard order (hard links, not copies)."""
    out = ctx.out / "generations"
    out.mkdir()
    for i, part in enumerate(parts):
        shards.link_or_copy(part, out / f"part-{i:05d}.parquet")
    columns = pd.concat([pd.read_parquet(p, columns=["n_tokens", "finish_reason"]) for p in parts], ignore_index=True)
    timings = {k: round(sum(s.get(k, 0) for s in part_stats), 2) for k in ("engine_start_s", "generation_s")}
    timings["engines"] = [served for s in part_stats for served in s.get("engines", [])]
    ctx.stats.update(
        prompts=sum(s["prompts"] for s in part_stats),
        responses=len(columns),
        tokens=int(columns["n_tokens"].sum()),
        mean_response_tokens=round(float(columns["n_tokens"].mean()), 2) if len(columns) else None,
        hit_length_limit=int((columns["finish_reason"] == "length").sum()),
        skipped_overlong_prompts=sum(s["skipped_overlong_prompts"] for s in part_stats),
        **timings,
        chat_template_sha256=part_stats[0]["chat_template_sha256"],
    )
