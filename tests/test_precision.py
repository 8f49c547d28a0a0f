"""precision=auto|fp32|bf16 (selfplay/backends/precision.py): detection of the CPU's bf16 units, resolution at start-up, and
the numbers kept under bf16 — DPO's first loss is ln 2 with the margin stage's reused reference log-probs, and
rescoring and reward scoring agree with fp32 within the tolerances documented here and in docs/performance.md."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from selfplay.backends.precision import (
    cpu_bf16_unit,
    cpu_class,
    cpu_flags,
    engine_dtype,
    native_bf16,
    resolve,
    stage_bf16,
    train_bf16,
)
from selfplay.config import ConfigError, conf_dir, register, validate
from selfplay.rundir.manifest import diff_config

# bf16 keeps 8 significant bits: each matmul output is rounded to a relative u = 2⁻⁸ ≈ 0.4%, and through 30 layers a
# few such roundings add up in each token's log-prob (logit − logsumexp). Documented tolerances (docs/performance.md), each ≈ 5·u:
LOGP_REL_TOL = 0.02  # |Δ| of a response's log-prob sum against |sum| (measured 2026-12-01: at most 1.0%)
# |Δ reward| against the batch's largest |reward|: a reward is a linear read-out of the last hidden state, which carries
# the same few roundings (measured 2026-12-08: 1.3% on an avx2 CPU, whose bf16 is emulated and rounds more often;
# against the batch's spread that was 5.7%, so the spread is no bound: a random head's rewards barely differ)
REWARD_REL_TOL = 0.02


def composed(*overrides: str):
    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_cpu_bf16_units_are_read_from_the_processor_flags():
    assert cpu_bf16_unit({"avx2", "amx_bf16", "amx_tile", "avx512_bf16"}) == "AMX-BF16 tiles"
    assert cpu_bf16_unit({"avx512f", "avx512_bf16"}) == "AVX512-BF16"
    assert cpu_bf16_unit({"avx2", "fma"}) is None
    assert native_bf16(torch.device("cpu"), {"avx2"}) == (False, "no AMX-BF16 or AVX512-BF16 on this CPU")
    print("this machine:", native_bf16(torch.device("cpu")))


@pytest.mark.parametrize("flags, expected", [("fpu avx2 amx_bf16 amx_tile avx512_bf16", "amx"),
                                             ("avx2 avx512f avx512_bf16", "avx512bf16"), ("sse4_2 avx2 fma", "avx2"),
                                             ("sse4_2", "other")])
def test_processor_class_is_read_alike_by_python_and_by_ci(tmp_path, flags, expected):
    """.ci/run names the class with scripts/cpu_class.sh (no Python needed); figures name it with cpu_class."""
    import subprocess

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_class(cpu_flags(cpuinfo)) == expected
    script = Path(__file__).resolve().parents[1] / "scripts" / "cpu_class.sh"
    shown = subprocess.run(["bash", str(script)], env={"SELFPLAY_CPUINFO": str(cpuinfo)}, capture_output=True,
                           text=True, check=True)
    assert shown.stdout.strip() == expected


def test_auto_resolves_once_to_what_the_machine_has(caplog):
    caplog.set_level(logging.INFO, logger="selfplay")
    cfg = composed("device=cpu")
    assert cfg.precision == "auto"
    assert resolve(cfg, flags={"avx512_bf16"}) == "bf16" and cfg.precision == "bf16"
    assert stage_bf16(cfg) and train_bf16(cfg) and engine_dtype(cfg) == "bfloat16"
    cfg = composed("device=cpu")
    assert resolve(cfg, flags={"avx2"}) == "fp32" and cfg.precision == "fp32"
    assert not stage_bf16(cfg) and not train_bf16(cfg) and engine_dtype(cfg) == "float32"
    assert "precision=auto: fp32 on cpu (no AMX-BF16 or AVX512-BF16 on this CPU)" in caplog.text
    # one switch: precision=fp32 trains in fp32 too; a 16-bit model.dtype is kept for vLLM
    cfg = composed("device=cpu", "precision=fp32", "model.dtype=bfloat16")
    assert not train_bf16(cfg) and not stage_bf16(cfg) and engine_dtype(cfg) == "bfloat16"


@pytest.mark.parametrize(("override", "option"), [("precision=fp16", "precision"), ("trainer.optim=adamw_nope", "trainer.optim")])
def test_bad_precision_and_optimizer_are_refused_by_name(override, option):
    with pytest.raises(ConfigError, match=option):
        validate(composed(override))


def test_runs_begun_before_the_option_resume_at_its_old_value():
    """A manifest of config schema 1 without `precision` was written before the option existed: it ran fp32."""
    old = {"model.dtype": "float32", "trainer": {"beta": 0.1}}
    new = {**old, "precision": "fp32", "trainer": {"beta": 0.1, "optim": "adamw_torch"}}
    assert diff_config(old, new, recorded_schema=1) == []
    assert diff_config(old, {**old, "precision": "bf16"}, recorded_schema=1) == ["precision: 'fp32' -> 'bf16'"]
    assert diff_config({**old, "precision": "bf16"}, {**old, "precision": "fp32"}, recorded_schema=1) == [
        "precision: 'bf16' -> 'fp32'"]


@pytest.fixture(scope="module")
def embedded(selfplay_cache):
    """The embedded SmolLM2-135M (real weights: a random model's flat logits would hide bf16's rounding)."""
    from selfplay.backends.default_model import ensure_default_policy
    from selfplay.backends.modeling import load_causal_lm, load_tokenizer

    path = ensure_default_policy()
    return path, load_tokenizer(path), load_causal_lm(path, "float32", torch.device("cpu"))


def _pairs(tokenizer, n: int = 6):
    from selfplay.rewards.ifeval import build_prompts

    prompts = [row["prompt"] for row in build_prompts(n, seed=3)]
    chosen = [f"Here is a short answer to the task, number {i}, written in plain words." for i in range(n)]
    rejected = [f"NO. {i}" for i in range(n)]
    return prompts, chosen, rejected


def test_bf16_rescoring_and_reward_scoring_agree_with_fp32(embedded, tmp_path):
    import pandas as pd
    from transformers import AutoModelForSequenceClassification

    from selfplay.backends.batching import token_budget_batches
    from selfplay.backends.chat import training_tokens
    from selfplay.backends.logprobs import completion_logps
    from selfplay.rewards.scoring import ClassifierScorer

    path, tokenizer, model = embedded
    prompts, chosen, rejected = _pairs(tokenizer)
    seqs = [training_tokens(tokenizer, p, r, "dpo", 512) for p, r in zip(prompts * 2, chosen + rejected, strict=True)]
    batches = token_budget_batches([len(a) + len(b) for a, b in seqs], 4, 4096)
    device = torch.device("cpu")
    fp32, counts = completion_logps(model, seqs, device, batches, tokenizer.pad_token_id, desc="fp32")
    bf16, _ = completion_logps(model, seqs, device, batches, tokenizer.pad_token_id, desc="bf16", bf16=True)
    relative = np.abs(bf16 - fp32) / np.abs(fp32)
    print(f"log-prob sums: |bf16 − fp32|/|fp32| mean {relative.mean():.4f}, max {relative.max():.4f}; "
          f"per token at most {(np.abs(bf16 - fp32) / counts).max():.4f} nats")
    assert relative.max() <= LOGP_REL_TOL
    assert not np.array_equal(bf16, fp32)  # bf16 really ran
    # the implicit margins keep their order where fp32's differ clearly
    margin32, margin16 = fp32[:6] - fp32[6:], bf16[:6] - bf16[6:]
    clear = np.abs(margin32) > 1.0
    assert (np.sign(margin32[clear]) == np.sign(margin16[clear])).all()

    config = model.config
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    frame = pd.DataFrame({"prompt_id": [str(i) for i in range(12)], "prompt": prompts * 2,
                          "response": chosen + rejected})
    rewards = {bf16: ClassifierScorer(str(tmp_path / "rm"), "float32", 4, 1024, device, False, 4096, bf16=bf16)(
        frame, desc="reward").to_numpy() for bf16 in (False, True)}
    largest = np.abs(rewards[False]).max()
    worst = np.abs(rewards[True] - rewards[False]).max()
    print(f"rewards: bf16 − fp32 at most {worst:.4f} against a largest |reward| of {largest:.4f} "
          f"(spread {rewards[False].std():.4f})")
    assert rewards[False].std() > 0 and worst <= REWARD_REL_TOL * largest


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_first_dpo_loss_is_ln2_with_reused_reference_logps(embedded, tmp_path, precision):
    """The margin stage's log-probs (its batching, its LM head) are DPO's reference; the trainer's own forward of the
    same tokens under the same precision gives the same numbers, so the first loss is ln 2 and the first logged
    rewards are 0 — up to the rounding of two different batch layouts, which bf16 makes coarser."""
    import pandas as pd

    from selfplay.backends.batching import token_budget_batches
    from selfplay.backends.chat import prompt_messages, response_messages, training_tokens
    from selfplay.backends.logprobs import completion_logps
    from selfplay.stages.train import build_trainer

    path, tokenizer, model = embedded
    prompts, chosen, rejected = _pairs(tokenizer, 4)
    # one epoch of one batch: only the first step's log is read
    cfg = composed("device=cpu", f"precision={precision}", "trainer.batch_size=4", "trainer.epochs=1",
                   "trainer.save_steps=0",
                   "trainer.learning_rate=1e-7", "trainer.max_length=512")
    seqs = [training_tokens(tokenizer, p, r, "dpo", 512) for p, r in zip(prompts * 2, chosen + rejected, strict=True)]
    sums, _ = completion_logps(model, seqs, torch.device("cpu"),
                                    token_budget_batches([len(a) + len(b) for a, b in seqs], 16, 8192),
                                    tokenizer.pad_token_id, desc="margin", bf16=train_bf16(cfg))
    selected = pd.DataFrame({"prompt": [prompt_messages(p) for p in prompts],
                             "chosen": [response_messages(c) for c in chosen],
                             "rejected": [response_messages(r) for r in rejected],
                             "logp_chosen_sum": sums[:4], "logp_rejected_sum": sums[4:]})
    from selfplay.backends.modeling import load_causal_lm

    trainer = build_trainer(cfg, load_causal_lm(path, "float32", torch.device("cpu")).train(), tokenizer, selected,
                            str(tmp_path / "out"))
    assert trainer.args.bf16 == (precision == "bf16")
    trainer.train()
    first = trainer.state.log_history[0]
    # β·(log π − log π_ref) per response: the two computations of one sum differ by at most rel·|sum|, where rel is
    # fp32's few ulps (1e-6) or bf16's tolerance
    beta, largest = cfg.trainer.beta, np.abs(sums).max()
    tol = {"fp32": 1e-6, "bf16": LOGP_REL_TOL}[precision] * largest
    print(f"{precision}: first loss {first['loss']:.6f} (ln 2 {math.log(2):.6f}); rewards/chosen "
          f"{first['rewards/chosen']:.2e}, rewards/rejected {first['rewards/rejected']:.2e}")
    # the trainer ran at the stage's precision: its log-probs are the margin stage's numbers
    assert abs(first["logps/chosen"] - sums[:4].mean()) <= max(tol, 1e-3)
    assert abs(first["rewards/chosen"]) <= beta * tol and abs(first["rewards/rejected"]) <= beta * tol
    # loss = mean −log σ(β·h) ≈ ln 2 − mean(β·h)/2, and |β·h| ≤ 2·β·tol per pair
    assert abs(first["loss"] - math.log(2)) <= beta * tol


@pytest.mark.skipif(torch.cuda.is_available(), reason="device=auto is a GPU there")
def test_device_auto_on_a_cpu_machine_trains_on_the_cpu():
    """device=auto (the default) resolves to the CPU here: TrainingArguments must say so, or bf16 is refused."""
    from selfplay.stages.train import common_args

    args = common_args(composed("device=auto", "precision=bf16"), "unused")
    assert args["use_cpu"] and args["bf16"]
    from trl import DPOConfig

    assert DPOConfig(**args).bf16 and DPOConfig(**args).use_cpu
