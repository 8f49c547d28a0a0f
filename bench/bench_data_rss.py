"""Peak memory and seconds of the data stages at realistic sizes: one round of prompts → generate → score → pair →
margin → select for each prompt count (default 10k and 1M, n = 2 responses of ~256 tokens per prompt), each stage
run by the real `selfplay stage <name> round=0` command as its own process, so each stage's peak RSS is its own.

Only the data grows:

* the policy is a tiny random LlamaForCausalLM (hidden 16, 1 layer; selfplay.testing.make_policy) over its own
  word-level tokenizer: 500 made-up words plus `<unk>`, `<pad>`, `<|im_start|>`, `<|im_end|>` and the role
  names, with a ChatML chat template, so one word is one token and the margin stage's LM head is 507 wide,
  not SmolLM2's 49k (built once per workdir, in `<workdir>/policy`; the margin stage's tokenisation is checked on
  it, DPO's and SimPO's, before any size runs);
* the reward is `bench/rewards_for_bench.py:words_and_hash` (reward.backend=function): word count + crc32 fraction,
  so the two responses of a prompt never tie;
* generate is replaced by a **generation stand-in** (this file, `generation-stand-in`): sampling 2M responses of
  256 tokens is far too slow on a few CPU cores. The stand-in streams the round's prompts.parquet and writes
  round_00/generations/part-*.parquet (parts of --part-rows rows, written in row groups) with exactly the generate
  stage's columns (prompt_id, prompt, sample_idx, response, n_tokens, finish_reason, + the prompt file's other
  columns; prompt-file order, a prompt's n samples adjacent, sample_idx 0..n-1). Each response is uniform
  --min-words..--max-words random vocabulary words, seeded by --seed, n_tokens = its word count, finish_reason
  "stop". It publishes the generate manifest through the runner's own functions (stages.base.config_view,
  stage_config_keys, input_fingerprints; rundir.manifest.decide and StageWriter, which checksums the outputs,
  builds the manifest and writes it atomically), reading the config the prompts command resolved and saved
  (<run>/config.yaml). The manifest's stats say `stand_in`. After it, the real `selfplay stage generate` is run
  once with a fault point armed at its start (SELFPLAY_FAULT_KILL=r00/generate/start#1): it must skip generate as
  complete, so a wrong config view or input fingerprint stops the benchmark instead of generating.

Per stage and size it records the process's peak RSS (os.wait4's ru_maxrss for the whole process, and the
manifest's timings.peak_rss_mb at commit), seconds (the manifest's timings.seconds, the stage's own work, and the
subprocess's wall time, which adds interpreter start-up and the input checksums), and rows in/out from the
manifests' stats; then the disk the run directory used.

    .venv/bin/python bench/bench_data_rss.py [--sizes 10000 1000000] [--n 2] [--workdir DIR] [--markdown PATH]
                                             [--keep-runs] [--seed 0] [--part-rows 50000]

Disk: the round's tables hold the responses several times over (generations, scores, candidate pairs, pairs,
selected): 9.5 KB per prompt at n = 2 measured at 20k prompts, so ~10 GB at 1M. Before a size starts, the free space
of --workdir is checked against 13 KB per prompt; each run directory is removed after its size is measured unless
--keep-runs. Logs of every subprocess: <workdir>/logs/. Seconds are only comparable on an otherwise idle machine:
the load average before and after each size is printed and written to the markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
ROLES = ["system", "user", "assistant"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
VOCAB_WORDS = 500
STAND_IN = "generation stand-in"
STAGES = ("prompts", "generate", "score", "pair", "margin", "select")
SELFPLAY_STAGES = ("prompts", "score", "pair", "margin", "select")  # generate is the stand-in, not selfplay's
BYTES_PER_PROMPT = 13_000  # free disk asked for per prompt at n=2 (a run directory took 9.5 KB at 20k prompts)
GROUP_ROWS = 10_000  # rows per row group of the stand-in's parts (and per seeded draw)


def made_up_words(count: int = VOCAB_WORDS) -> list[str]:
    """`count` distinct lower-case two- and three-syllable words, the same every time."""
    import numpy as np

    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    two = [a + b for a in syllables for b in syllables]
    three = [a + b + c for a in syllables[:20] for b in syllables[:20] for c in syllables[:20]]
    pool = np.array(two + three)
    return sorted(np.random.default_rng(20_260_101).choice(pool, size=count, replace=False).tolist())


def vocabulary_words(tokenizer) -> list[str]:
    """The tokenizer's plain words (what responses are drawn from): its vocabulary less special tokens and roles."""
    skip = set(tokenizer.all_special_tokens) | set(SPECIALS) | set(ROLES)
    return [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if t not in skip]


def build_policy(out: Path) -> Path:
    """A tiny random causal LM over a word-level tokenizer with a ChatML template (see the module docstring)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from selfplay.testing import make_policy

    vocab = {token: i for i, token in enumerate([*SPECIALS, *ROLES, *made_up_words()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)  # matched whole, before the whitespace split
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_policy(tokenizer, tmp, hidden=16, layers=1)  # 4 heads of 4, intermediate 32, tied embeddings, safetensors
    tmp.rename(out)
    return out


def check_tokenisation(policy: Path, words: int = 256) -> str:
    """The margin stage's tokenisation (selfplay.backends.chat.training_tokens, DPO's and SimPO's) on the policy: a
    prompt gives ids, a response of `words` vocabulary words gives `words` ids (+ the end of turn), none <unk>."""
    from selfplay.backends.chat import generation_prompt_ids, training_tokens
    from selfplay.backends.modeling import check_weights, load_tokenizer

    check_weights(policy)
    tokenizer = load_tokenizer(policy)
    vocab = vocabulary_words(tokenizer)
    prompt = " ".join(vocab[:12])
    response = " ".join(vocab[i * 7 % len(vocab)] for i in range(words))
    found = [f"generation prompt {len(generation_prompt_ids(tokenizer, prompt))} ids"]
    for objective in ("dpo", "simpo"):
        prompt_ids, completion_ids = training_tokens(tokenizer, prompt, response, objective, 512)
        if not prompt_ids or not words <= len(completion_ids) <= words + 2 or tokenizer.unk_token_id in completion_ids:
            raise SystemExit(f"tokeniser check failed ({objective}): {len(prompt_ids)} prompt ids, "
                             f"{len(completion_ids)} completion ids for {words} words")
        found.append(f"{objective}: prompt {len(prompt_ids)} ids, completion {len(completion_ids)} ids")
    return f"tokeniser check ({words}-word response, vocabulary {len(tokenizer)}): " + "; ".join(found)


def write_prompt_file(path: Path, rows: int, seed: int, chunk: int = 100_000) -> None:
    """A `prompt` column of `rows` prompts of 8–24 vocabulary words, written in chunks."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = pa.array(made_up_words(), pa.large_string())
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, pa.schema([("prompt", pa.large_string())])) as writer:
        for start in range(0, rows, chunk):
            rng = np.random.default_rng([seed, 1, start // chunk])
            lengths = rng.integers(8, 25, size=min(chunk, rows - start))
            writer.write_table(pa.table({"prompt": random_texts(rng, words, lengths)}))
    tmp.rename(path)


def random_texts(rng, words, lengths):
    """One text per entry of `lengths`: that many words drawn uniformly from the arrow array `words`, joined by
    spaces. Built in arrow (take, then binary_join over list offsets), so no Python string exists per text."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    drawn = words.take(pa.array(rng.integers(len(words), size=int(offsets[-1]))))
    return pc.binary_join(pa.LargeListArray.from_arrays(pa.array(offsets), drawn), pa.scalar(" ", pa.large_string()))


# ---------------------------------------------------------------------------------------------- generation stand-in

def generation_stand_in(run_dir: Path, seed: int, part_rows: int, min_words: int, max_words: int) -> dict:
    """Write round 0's generations without a model and publish them as the generate stage (module docstring)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf

    from selfplay.backends.chat import template_sha256
    from selfplay.backends.modeling import load_tokenizer
    from selfplay.rundir import checkpoints
    from selfplay.rundir import manifest as mf
    from selfplay.rundir.layout import round_dir
    from selfplay.stages.base import (
        StageContext,
        config_view,
        input_fingerprints,
        stage_config_keys,
        stage_module,
        stage_outputs,
    )

    # What the prompts command ran with, as the CLI resolved it (pipeline.save_config writes it before each stage).
    cfg = OmegaConf.load(run_dir / "config.yaml")
    module, r = stage_module("generate"), 0
    rdir = round_dir(run_dir, r)
    # As pipeline.run_stage: the config view and inputs the runner will compare, and its decision.
    config = config_view(cfg, stage_config_keys(module, cfg))
    inputs = input_fingerprints(cfg, run_dir, "generate", r)
    decision = mf.decide(rdir, "generate", config, inputs, force=False)
    if not decision.run:
        raise SystemExit(f"{rdir}/generate is already complete")
    input_fingerprints(cfg, run_dir, "generate", r, verify=True)
    n = int(cfg.sampler.n)
    if max_words > cfg.sampler.max_new_tokens:
        raise SystemExit(f"--max-words {max_words} exceeds sampler.max_new_tokens={cfg.sampler.max_new_tokens}")
    ctx = StageContext(cfg=cfg, run_dir=run_dir, round=r, out=rdir)
    tokenizer = load_tokenizer(ctx.policy_path(), cfg.model.trust_remote_code)
    words = pa.array(vocabulary_words(tokenizer), pa.large_string())
    # The prompts stage writes one row group: read it in pieces through a small buffer, not the whole chunk at once.
    prompts = pq.ParquetFile(ctx.path("prompts.parquet"), pre_buffer=False, buffer_size=1 << 20)
    started = time.time()
    counts = {"prompts": 0, "responses": 0, "tokens": 0}
    with mf.StageWriter(rdir, "generate", stage_outputs(module, r)) as stage_writer:
        out = stage_writer.tmp / "generations"
        out.mkdir()
        part, writer, in_part = 0, None, 0
        for group, batch in enumerate(prompts.iter_batches(batch_size=max(1, GROUP_ROWS // n))):
            rng = np.random.default_rng([seed, 2, group])
            rows = batch.num_rows * n
            lengths = rng.integers(min_words, max_words + 1, size=rows)
            prompt_rows = pa.Table.from_batches([batch]).take(pa.array(np.repeat(np.arange(batch.num_rows), n)))
            extra = [c for c in prompt_rows.column_names if c not in ("prompt_id", "prompt")]
            table = pa.table({
                "prompt_id": prompt_rows["prompt_id"], "prompt": prompt_rows["prompt"],
                "sample_idx": pa.array(np.tile(np.arange(n, dtype=np.int64), batch.num_rows)),
                "response": random_texts(rng, words, lengths), "n_tokens": pa.array(lengths.astype(np.int64)),
                "finish_reason": pa.repeat(pa.scalar("stop", pa.large_string()), rows),
                **{c: prompt_rows[c] for c in extra}})
            if writer is None:
                writer = pq.ParquetWriter(out / f"part-{part:05d}.parquet", table.schema)
            writer.write_table(table)
            in_part += rows
            counts["prompts"] += batch.num_rows
            counts["responses"] += rows
            counts["tokens"] += int(lengths.sum())
            if in_part >= part_rows:
                writer.close()
                part, writer, in_part = part + 1, None, 0
        if writer is not None:
            writer.close()
        stats = dict(counts, mean_response_tokens=round(counts["tokens"] / counts["responses"], 2)
                     if counts["responses"] else None, hit_length_limit=0, skipped_overlong_prompts=0,
                     engine_start_s=0.0, generation_s=round(time.time() - started, 2),
                     chat_template_sha256=template_sha256(tokenizer),
                     stand_in=f"bench/bench_data_rss.py {STAND_IN}: {min_words}-{max_words} random vocabulary words "
                              f"per response, seed {seed}; no model ran")
        manifest = stage_writer.commit(config, inputs, stats)
    checkpoints.clear(rdir, "generate")
    return manifest


# ----------------------------------------------------------------------------------------------------------- driver

def run_process(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float, float]:
    """Run `cmd` (output to `log`); returns (exit code, wall seconds, the process's peak RSS in MB from wait4)."""
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - started, usage.ru_maxrss / 1024


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]


def rows_in_out(stage: str, manifests: dict[str, dict]) -> tuple[int | None, int | None]:
    st = {s: m["stats"] for s, m in manifests.items()}
    return {"prompts": (None, st["prompts"]["rows"]),
            "generate": (st["generate"]["prompts"], st["generate"]["responses"]),
            "score": (st["generate"]["responses"], st["score"]["responses"]),
            "pair": (st["score"]["responses"], st["pair"]["pairs"]),
            "margin": (st["pair"]["pairs"], st["margin"]["pairs"]),
            "select": (st["margin"]["pairs"], st["select"]["selected"])}[stage]


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_size(size: int, args, work: Path, policy: Path, env: dict[str, str]) -> dict:
    free = shutil.disk_usage(work).free
    needed = BYTES_PER_PROMPT * size * args.n // 2
    if free < needed:
        raise SystemExit(f"{size:,} prompts need ~{needed / 1e9:.1f} GB under {work}, only {free / 1e9:.1f} GB free")
    prompts = work / f"prompts-{size}.parquet"
    if not prompts.exists():
        write_prompt_file(prompts, size + 10, args.seed)
    load_before = os.getloadavg()[0]
    run_name = f"rss-{size}"
    run_dir = work / run_name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"output_root={work}", f"run_name={run_name}", f"model.path={policy}", "model.dtype=float32",
                 "device=cpu", "precision=fp32", f"prompts.source={prompts}", f"prompts.per_round={size}",
                 "prompts.eval_count=10", "sampler=hf", f"sampler.n={args.n}",
                 f"sampler.max_new_tokens={args.max_words + 10}", "reward=function",
                 "reward.function=rewards_for_bench:words_and_hash", "margin.batch_size=256", "margin.max_batch_tokens=131072", "selection.ratio=0.5",
                 "trainer.max_length=512"]
    selfplay = [sys.executable, "-m", "selfplay.cli", "stage"]
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    measured: dict[str, dict] = {}

    def step(stage: str, cmd: list[str], step_env: dict[str, str] | None = None) -> tuple[int, float, float, Path]:
        label = STAND_IN if stage == "generate" else stage
        print(f"[{size:,} prompts] {label} ...", flush=True)
        log = logs / f"{size}-{stage}.log"
        rc, wall, peak = run_process(cmd, log, step_env or env)
        print(f"[{size:,} prompts] {label} done in {wall:.1f} s (peak RSS {peak:,.0f} MB)", flush=True)
        return rc, wall, peak, log

    for stage in STAGES:
        if stage == "generate":
            cmd = [sys.executable, str(Path(__file__).resolve()), "generation-stand-in", str(run_dir),
                   f"--seed={args.seed}", f"--part-rows={args.part_rows}", f"--min-words={args.min_words}",
                   f"--max-words={args.max_words}"]
        else:
            cmd = [*selfplay, stage, "round=0", *overrides]
        rc, wall, peak, log = step(stage, cmd)
        if rc != 0:
            raise SystemExit(f"{stage} failed (exit {rc}), {log}:\n{tail(log)}")
        manifest = json.loads((run_dir / "round_00" / f"{stage}.done.json").read_text())
        measured[stage] = {"wall_s": wall, "peak_mb": peak, "manifest": manifest}
        if stage == "generate":  # the real runner must take the stand-in's manifest as a finished generate
            before = (run_dir / "round_00" / "generate.done.json").read_text()
            rc, wall, _, log = step("generate-check", [*selfplay, "generate", "round=0", *overrides],
                                    {**env, "SELFPLAY_FAULT_KILL": "r00/generate/start#1"})
            skipped = re.search(r"round 0 generate\s+skipped \(complete\)", log.read_text(errors="replace"))
            if rc != 0 or not skipped or (run_dir / "round_00" / "generate.done.json").read_text() != before:
                raise SystemExit(f"`selfplay stage generate` did not take the {STAND_IN}'s manifest as complete "
                                 f"(exit {rc}; a kill means it started generating), {log}:\n{tail(log)}")
            print(f"[{size:,} prompts] `selfplay stage generate` skips generate as complete ({wall:.1f} s)", flush=True)
    manifests = {s: m["manifest"] for s, m in measured.items()}
    for stage, m in measured.items():
        m["stage_s"] = m["manifest"]["timings"]["seconds"]
        m["manifest_peak_mb"] = m["manifest"]["timings"]["peak_rss_mb"]
        m["rows"] = rows_in_out(stage, manifests)
        del m["manifest"]
    used = disk_bytes(run_dir)
    load = (load_before, os.getloadavg()[0])
    print(f"[{size:,} prompts] run directory: {used / 1e9:.2f} GB; load average {load[0]:.2f} before, {load[1]:.2f} "
          "after", flush=True)
    if not args.keep_runs:
        shutil.rmtree(run_dir)
    return {"size": size, "stages": measured, "disk_bytes": used, "load": load,
            "mean_response_tokens": manifests["generate"]["stats"]["mean_response_tokens"]}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(results: list[dict]) -> tuple[str, list[str]]:
    """The summary table (markdown-style, also printed), the per-size detail table, and the two final lines."""
    small, large = results[0], results[-1]
    size_ratio = large["size"] / small["size"]
    head = ["stage", *(f"s @ {r['size']:,}" for r in results), "s ratio / size ratio",
            *(f"peak MB @ {r['size']:,}" for r in results), "RSS ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for stage in STAGES:
        s = [r["stages"][stage]["stage_s"] for r in results]
        mb = [r["stages"][stage]["peak_mb"] for r in results]
        label = STAND_IN if stage == "generate" else stage
        lines.append("| " + " | ".join([label, *(f"{x:.1f}" for x in s), f"{ratio(s[-1], s[0]) / size_ratio:.2f}",
                                         *(f"{x:,.0f}" for x in mb), f"{ratio(mb[-1], mb[0]):.2f}x"]) + " |")
    detail = ["| prompts | stage | wall s | stage s | peak RSS MB (process) | peak RSS MB (manifest) | rows in | rows out |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for stage in STAGES:
            m = r["stages"][stage]
            rows = [f"{x:,}" if x is not None else "" for x in m["rows"]]
            detail.append(f"| {r['size']:,} | {STAND_IN if stage == 'generate' else stage} | {m['wall_s']:.1f} | "
                          f"{m['stage_s']:.1f} | {m['peak_mb']:,.0f} | {m['manifest_peak_mb']:,.0f} | {rows[0]} | "
                          f"{rows[1]} |")
    peak = [max(r["stages"][s]["peak_mb"] for s in SELFPLAY_STAGES) for r in (small, large)]
    worst = max(ratio(large["stages"][s]["stage_s"], small["stages"][s]["stage_s"]) / size_ratio
                for s in SELFPLAY_STAGES)
    final = [f"peak RSS {large['size']:,} vs {small['size']:,} prompts: {ratio(peak[1], peak[0]):.2f}x "
             f"(max over the selfplay stage processes: {peak[1]:,.0f} vs {peak[0]:,.0f} MB)",
             f"largest per-stage seconds ratio / size ratio: {worst:.2f}"]
    disk = ", ".join(f"{r['size']:,} prompts {r['disk_bytes'] / 1e9:.2f} GB" for r in results)
    tokens = ", ".join(f"{r['mean_response_tokens']}" for r in results)
    load = ", ".join(f"{r['size']:,} prompts {r['load'][0]:.2f} before / {r['load'][1]:.2f} after" for r in results)
    text = "\n".join(lines) + "\n\nPer size:\n\n" + "\n".join(detail) + (
        f"\n\nRun directory on disk: {disk}. Mean response tokens: {tokens}. 1-minute load average: {load}.\n")
    return text, final


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))})"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "generation-stand-in":
        ap = argparse.ArgumentParser(prog="bench_data_rss.py generation-stand-in")
        ap.add_argument("run_dir", type=Path)
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("--part-rows", type=int, default=50_000)
        ap.add_argument("--min-words", type=int, default=200)
        ap.add_argument("--max-words", type=int, default=310)
        a = ap.parse_args(sys.argv[2:])
        m = generation_stand_in(a.run_dir, a.seed, a.part_rows, a.min_words, a.max_words)
        print(f"{STAND_IN}: {m['stats']['responses']:,} responses in {len(m['outputs'])} parts, "
              f"{m['stats']['mean_response_tokens']} tokens on average, {m['timings']['seconds']} s")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="default: a new temp dir (needs ~13 KB per prompt of disk)")
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--keep-runs", action="store_true", help="keep each size's run directory")
    ap.add_argument("--seed", type=int, default=0, help="of the prompts and the stand-in's responses")
    ap.add_argument("--part-rows", type=int, default=50_000, help="rows per generations part of the stand-in")
    ap.add_argument("--min-words", type=int, default=200)
    ap.add_argument("--max-words", type=int, default=310)
    args = ap.parse_args()
    args.sizes = sorted(args.sizes)
    command = shlex.join([sys.executable, *sys.argv])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-rss-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work} ({shutil.disk_usage(work).free / 1e9:.0f} GB free)", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH")) if p)}
    policy = work / "policy"
    if not policy.exists():
        build_policy(policy)
    print(check_tokenisation(policy), flush=True)
    results = [run_size(size, args, work, policy, env) for size in args.sizes]
    text, final = report(results)
    print("\n" + text + "\n" + "\n".join(final))
    if args.markdown:
        sizes = " vs ".join(f"{s:,}" for s in args.sizes)
        args.markdown.write_text("\n".join([
            f"# Data stages at realistic sizes, {sizes} prompts — CPU, {datetime.date.today().isoformat()}", "",
            f"Machine: {machine()}.", "", "Command:", "", f"    {command}", "",
            f"One round of prompts → {STAND_IN} → score → pair → margin → select, each stage its own "
            f"`selfplay stage <name> round=0` process; n = {args.n} responses of {args.min_words}–{args.max_words} "
            "words (= tokens) per prompt from the bench's generation stand-in (no model samples them); a tiny random "
            f"policy (hidden 16, 1 layer) over a {VOCAB_WORDS + len(SPECIALS) + len(ROLES):,}-token word-level "
            "vocabulary; reward "
            "`rewards_for_bench:words_and_hash`; selection.ratio 0.5. Seconds are the manifests' stage seconds; "
            "peak RSS is each process's (wait4). Ratios: largest size vs smallest.", "",
            text, *final, ""]))
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
