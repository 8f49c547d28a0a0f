"""transformers `generate` sampler: length-sorted batches (within windows), N samples per prompt, seeded per batch."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from selfplay.backends.chat import generation_prompt_ids
from selfplay.backends.modeling import load_causal_lm, load_tokenizer
from selfplay.backends.precision import engine_dtype, stage_bf16
from selfplay.backends.samplers.base import Completion, Sampler, SamplingSpec, completion_from_tokens

log = logging.getLogger("selfplay")


def nucleus_mask(scores, top_p: float, candidates: int = 512):
    """Boolean mask of the tokens outside the top-p nucleus — the set transformers' TopPLogitsWarper removes, up to
    float rounding at the boundary (HF sums ascending over the whole vocabulary, this sums descending over the top
    candidates; a token within rounding of the threshold can land either side: 1 of 576 default-run responses).

    HF's warper sorts the whole vocabulary at every step (a quarter of sampling time for a 49k vocabulary on a
    CPU). A token is kept when the probability mass ranked above it is < top_p; when the `candidates` most likely
    tokens already hold ≥ top_p, everything below them is out, so sorting those suffices. Rows whose nucleus is
    wider fall back to a full sort.
    """
    import torch

    probs = scores.float().softmax(dim=-1)
    k = min(candidates, scores.shape[-1])
    top_probs, top_idx = probs.topk(k, dim=-1)  # sorted, descending
    mass_above = top_probs.cumsum(dim=-1) - top_probs
    keep_top = mass_above < top_p
    keep_top[:, 0] = True  # HF keeps at least one token
    remove = torch.ones_like(probs, dtype=torch.bool).scatter_(-1, top_idx, ~keep_top)
    wide = (top_probs.sum(dim=-1) < top_p).nonzero().flatten()
    if len(wide):  # flat distributions (rare in trained models, every row of a random one): one batched full sort
        sorted_probs, order = probs[wide].sort(dim=-1, descending=True)
        keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p
        keep[:, 0] = True
        remove[wide] = torch.ones_like(keep).scatter_(-1, order, ~keep)
    return remove


class TemperatureTopP:
    """Temperature then nucleus, as one LogitsProcessor: the same as transformers' TemperatureLogitsWarper followed
    by TopPLogitsWarper. Both steps live here because generate() runs user processors *before* its own warpers,
    so a top-p processor alone would see untempered logits."""

    def __init__(self, temperature: float, top_p: float):
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids, scores):
        scores = scores / self.temperature
        if self.top_p >= 1.0:
            return scores
        return scores.masked_fill(nucleus_mask(scores, self.top_p), -float("inf"))


class SampleByCDF:
    """Sampling as a LogitsProcessor for greedy decoding: one uniform number per row picks a token through the
    cumulative softmax (inverse-CDF sampling, exact), and every other token gets -inf, so greedy decoding after
    TemperatureTopP samples from the tempered nucleus. torch.multinomial (and any per-token noise) draws from the
    CPU generator element by element: 78% of a generation step for 512 rows × 49k vocabulary (bench_data_rss's
    tiny policy); one number per row and a cumsum cost a few percent."""

    def __call__(self, input_ids, scores):
        import torch

        cdf = torch.softmax(scores.float(), dim=-1).cumsum_(dim=-1)
        u = torch.rand(len(scores), 1, device=scores.device) * cdf[:, -1:]
        # right=True: the first token whose cumulative mass exceeds u, never one with probability 0
        picked = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -float("inf")).scatter_(1, picked, 0.0)


class HFSampler(Sampler):
    def __init__(self, model_path: Path, dtype: str, device: Any, trust_remote_code: bool = False,
                 bf16: bool = False):
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        # precision=bf16 arrives as dtype=bfloat16 (precision.engine_dtype): autocast over fp32 weights would re-cast
        # every weight at every decode step (inference mode keeps no cast cache), which on 2 CPU cores took away all
        # of bf16's gain (bench/results/precision_cpu.md).
        self.model = load_causal_lm(model_path, dtype, device, trust_remote_code)
        if bf16 and getattr(device, "type", str(device)) == "cpu":
            # PyTorch's CPU flash-attention kernel is slower in bf16 than in fp32 here; the eager attention's
            # matmuls run on the bf16 units (sampling 16 prompts × 4: 19.8 s with SDPA, 14.2 s eager; fp32 33.6 s).
            self.model.set_attn_implementation("eager")
        self.device = device
        self.skipped_overlong = 0  # generate() gives every prompt its max_new_tokens; none is skipped
        self.timings: dict[str, float] = {}  # the model loads in __init__, before the stage times anything
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])

    @classmethod
    def from_config(cls, cfg: Any, model_path: Path, device: Any) -> HFSampler:
        return cls(model_path=model_path, dtype=engine_dtype(cfg), device=device,
                   trust_remote_code=cfg.model.trust_remote_code, bf16=stage_bf16(cfg))

    def __call__(self, prompts: list[str], spec: SamplingSpec, desc: str = "generate",
                 keys: list[str] | None = None) -> list[Completion]:
        # `keys` (prompt ids) is unused here: this backend seeds per batch, by the batch's index in the list.
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        encoded = [generation_prompt_ids(self.tokenizer, p) for p in prompts]
        # Longest first within each window (the whole list when sort_window is 0): batches of similar length waste
        # little on padding (bench/bench_hf_batching.py: 0.80× the time of file order), and a shard — whole
        # windows — batches exactly as the single-process run does.
        window = spec.sort_window or max(len(prompts), 1)
        order = [i for start in range(0, len(prompts), window)
                 for i in sorted(range(start, min(start + window, len(prompts))), key=lambda i: (-len(encoded[i]), i))]
        # Greedy decoding in HF's loop; sampling is TemperatureTopP (HF's order, faster nucleus) then SampleByCDF.
        gen_config = GenerationConfig(
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=spec.max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        processors = [] if spec.greedy else [TemperatureTopP(spec.temperature, spec.top_p), SampleByCDF()]
        results: list[Completion] = []
        new_tokens = 0
        started = time.time()
        bar = tqdm(total=len(prompts) * spec.n, desc=desc, unit="resp", dynamic_ncols=True)
        for batch_no, start in enumerate(range(0, len(order), spec.batch_size)):
            idx = order[start : start + spec.batch_size]
            batch = self.tokenizer.pad(
                {"input_ids": [encoded[i] for i in idx]}, padding=True, padding_side="left", return_tensors="pt"
            ).to(self.device)
            # n rows per prompt, each prompt's together: row r is prompt idx[r // n], sample r % n
            batch = {k: v.repeat_interleave(spec.n, dim=0) for k, v in batch.items()}
            # One seed per batch: the same config gives the same responses, whatever ran before in the process.
            torch.manual_seed(spec.seed * 100_003 + spec.first_batch + batch_no)
            with torch.inference_mode():
                out = self.model.generate(**batch, generation_config=gen_config,
                                          logits_processor=LogitsProcessorList(processors))
            generated = out[:, batch["input_ids"].shape[1] :].tolist()
            for row, tokens in enumerate(generated):  # rows that ended early are padded after their end-of-turn
                completion = completion_from_tokens(self.tokenizer, tokens, self.eos_ids, idx[row // spec.n],
                                                    row % spec.n)
                new_tokens += completion.n_tokens
                results.append(completion)
            bar.update(len(generated))
            bar.set_postfix(tok_s=f"{new_tokens / max(time.time() - started, 1e-9):.0f}")
        bar.close()
        results.sort(key=lambda c: (c.prompt_index, c.sample_idx))
        return results
