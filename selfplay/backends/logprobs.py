"""Teacher-forced log-probabilities of completions, in the token-budget batches it is given, each sequence once.

The LM head runs only where a completion token is predicted, in chunks, with log p = logit − logsumexp: no
(batch, length, vocabulary) tensor. TRL's fused head does the same in tiles but costs ~5× the head's matmul on a
CPU (bench/bench_scoring.py); it stays the path for models that scale or soft-cap their logits. The trainer's
label head on a CPU (trl_trainers.add_label_head) computes its log-probs with head_logps, as the margin stage does.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from selfplay.backends import trl_private


class TokenPairs:
    """(prompt_ids, completion_ids) of many sequences in two flat int32 arrays: 4 bytes a token instead of a Python
    list of ints (~36), so the margin stage's memory hardly grows with the number of responses. Indexing gives
    lists back, one sequence at a time."""

    def __init__(self, pairs: Iterable[tuple[list[int], list[int]]]):
        tokens, ends = array("i"), array("q")
        for prompt, completion in pairs:
            tokens.extend(prompt)
            ends.append(len(tokens))
            tokens.extend(completion)
            ends.append(len(tokens))
        self._tokens = np.frombuffer(tokens, dtype=np.int32) if tokens else np.zeros(0, np.int32)
        self._ends = np.frombuffer(ends, dtype=np.int64) if ends else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._ends) // 2

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        start = int(self._ends[2 * i - 1]) if i > 0 else 0
        middle, end = int(self._ends[2 * i]), int(self._ends[2 * i + 1])
        return self._tokens[start:middle].tolist(), self._tokens[middle:end].tolist()

    def lengths(self) -> np.ndarray:
        """prompt + completion tokens of each sequence."""
        return np.diff(self._ends[1::2], prepend=0)

    def completion_lengths(self) -> np.ndarray:
        return self._ends[1::2] - self._ends[0::2]


def completion_logps(model: Any, sequences: Sequence[tuple[list[int], list[int]]], device: Any,
                     batches: list[list[int]], pad_token_id: int, desc: str = "log-probs",
                     bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sum of log π(y_t | x, y_<t) over each completion at temperature 1, and its token count.

    `sequences` holds (prompt_ids, completion_ids) pairs; `batches` lists the indices each forward pass takes
    (selfplay/backends/batching.py); rows in no batch stay 0. An empty completion gets sum 0 and count 0. `bf16` runs the
    forward under bf16 autocast, as the trainer does under precision=bf16, so reused reference log-probs match.
    """
    import torch

    sums = np.zeros(len(sequences))
    counts = np.array([len(c) for _, c in sequences])
    plain = plain_head(model)
    if plain is None:  # logit scaling or soft-capping: TRL's fused head knows each model's variant
        trl_private.add_fused_lm_head(model)
    bar = tqdm(total=sum(len(sequences[i][0]) + len(sequences[i][1]) for b in batches for i in b), desc=desc,
               unit="tok", unit_scale=True, dynamic_ncols=True)
    for idx in batches:
        lengths = [len(sequences[i][0]) + len(sequences[i][1]) for i in idx]
        ids = torch.full((len(idx), max(lengths)), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, i in enumerate(idx):  # right padding, like TRL's preference collator
            prompt, completion = sequences[i]
            full = torch.tensor(prompt + completion, dtype=torch.long)
            ids[row, : len(full)] = full
            mask[row, : len(full)] = 1
            labels[row, len(prompt) : len(full)] = full[len(prompt) :]
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            if plain is None:
                out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, fused_lm_head=True)
                sums[idx] = out.log_probs.float().sum(dim=1).cpu().numpy()
            else:
                sums[idx] = _label_logps(plain, ids, mask, labels).cpu().numpy()
        bar.update(sum(lengths))
    bar.close()
    return sums, counts


def plain_head(model: Any) -> tuple[Any, Any] | None:
    """(backbone, lm_head) when the logits are just lm_head(hidden) — Llama, Qwen, Mistral and most others — else
    None (models that scale or soft-cap their logits go through TRL's fused head instead)."""
    config = model.config.get_text_config()
    if any(getattr(config, key, None) not in (None, 1.0) for key in
           ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")):
        return None
    backbone, head = getattr(model, model.base_model_prefix, None), model.get_output_embeddings()
    return (backbone, head) if backbone is not None and head is not None else None


def _label_logps(plain: tuple[Any, Any], ids: Any, mask: Any, labels: Any, rows_per_chunk: int = 1024) -> Any:
    """Per-sequence sum of log-softmax at the label tokens. The LM head runs only at the positions that predict a
    label (completion tokens; prompt and padding are skipped) and in chunks, so no (batch, length, vocabulary)
    logits tensor exists: log p = logit[label] − logsumexp(logits), one exp pass per position."""
    import torch

    backbone, head = plain
    hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    scored = targets != -100
    positions = hidden[:, :-1][scored]  # (positions, hidden): the states that predict a label
    wanted, rows = targets[scored], scored.nonzero()[:, 0]
    logps = torch.empty(len(wanted), dtype=torch.float32, device=ids.device)
    for start in range(0, len(wanted), rows_per_chunk):
        chunk = wanted[start : start + rows_per_chunk]
        logps[start : start + len(chunk)] = head_logps(head, positions[start : start + rows_per_chunk], chunk)[0]
    return torch.zeros(len(ids), dtype=torch.float32, device=ids.device).index_add_(0, rows, logps)


def head_logps(head: Any, positions: Any, labels: Any, stats: bool = False) -> tuple[Any, ...]:
    """log p(label) = logit − logsumexp(logits) at each position, logits in fp32 (autocast computes the head's matmul
    in bf16 where it is on, for the margin stage and the trainer alike); with stats also TRL's per-token metrics:
    entropy, mean logit and whether the label is the argmax (no gradient)."""
    import torch

    logits = head(positions).float()
    logsumexp = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(1, labels[:, None])[:, 0] - logsumexp
    if not stats:
        return (logps,)
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        entropy = logsumexp - (probs * logits).sum(-1)
        return logps, entropy, logits.mean(-1), logits.argmax(-1) == labels


# Models whose attention is plain causal (no sliding window, no bidirectional prefix), so a custom mask that lets
# the rejected completion see its prompt and itself computes exactly what two separate rows compute.
SHARED_PROMPT_MODEL_TYPES = ("llama", "qwen2", "qwen3")


def shares_prompts(model: Any) -> bool:
    """Whether the trainer may put a pair in one row [prompt | chosen | rejected] (pack_shared_prompts). It runs on
    a CPU only (add_label_head), where transformers' attention (sdpa or eager) takes the custom 4D mask as given."""
    config = model.config.get_text_config()
    return config.model_type in SHARED_PROMPT_MODEL_TYPES and not getattr(config, "use_sliding_window", False)


@dataclass
class SharedPromptRows:
    """A preference batch with one row per pair: [prompt | chosen | rejected], the rejected tokens at positions
    restarting after the prompt and seeing the prompt and themselves, never the chosen ones (a boolean 4D mask).
    `source` holds (row, column) of the hidden state that predicts each completion token, in the order in which
    the batch's label positions are read (chosen rows first, then rejected, each left to right)."""

    input_ids: Any
    position_ids: Any
    attention_mask: Any
    source: Any

    def additive_mask(self) -> Any:
        """The mask as eager attention adds it to the scores: 0 where a token may look, the fp32 minimum elsewhere."""
        import torch

        return torch.zeros(self.attention_mask.shape).masked_fill(~self.attention_mask, torch.finfo(torch.float32).min)


def pack_shared_prompts(input_ids: Any, attention_mask: Any, labels: Any) -> SharedPromptRows | None:
    """TRL's preference batch (rows [chosen; rejected], each prompt + completion, right-padded; `labels` is -100
    outside the completions) as SharedPromptRows: the prompt of each pair is computed once instead of twice and
    the padding shrinks to the longest pair. None where the batch is not of that shape (a pair whose two rows
    start differently, a completion at position 0): the caller then runs the rows as they are."""
    import torch

    pairs = input_ids.shape[0] // 2
    if input_ids.shape[0] != 2 * pairs or pairs == 0:
        return None
    lengths = attention_mask.sum(dim=1).tolist()
    completion = (labels != -100).tolist()
    rows, sources_chosen, sources_rejected = [], [], []
    for i in range(pairs):
        parts = []
        for row in (i, pairs + i):
            n = int(lengths[row])
            flags = completion[row][:n]
            start = flags.index(True) if True in flags else n
            if start == 0 or not all(flags[start:]) or any(completion[row][n:]):
                return None
            parts.append((start, input_ids[row, :n]))
        (start, chosen), (start_rejected, rejected) = parts
        if start != start_rejected or not torch.equal(chosen[:start], rejected[:start]):
            return None
        rows.append((start, chosen, rejected[start:]))
    width = max(len(chosen) + len(rejected) for _, chosen, rejected in rows)
    ids = torch.zeros((pairs, width), dtype=input_ids.dtype, device=input_ids.device)
    positions = torch.zeros_like(ids)
    mask = torch.eye(width, dtype=torch.bool, device=input_ids.device).repeat(pairs, 1, 1, 1)  # padding sees itself
    for i, (start, chosen, rejected) in enumerate(rows):
        c, r = len(chosen), len(rejected)
        ids[i, :c], ids[i, c : c + r] = chosen, rejected
        positions[i, :c] = torch.arange(c)
        positions[i, c : c + r] = torch.arange(start, start + r)
        causal = torch.ones((width, width), dtype=torch.bool, device=input_ids.device).tril()
        mask[i, 0, :c, :c] = causal[:c, :c]
        mask[i, 0, c : c + r, :start] = True
        mask[i, 0, c : c + r, c : c + r] = causal[:r, :r]
        # chosen token t (at column t ≥ start) is predicted from column t − 1; the first rejected token from the
        # prompt's last column, the others from the rejected token before them
        sources_chosen += [(i, t - 1) for t in range(start, c)]
        if r:
            sources_rejected += [(i, start - 1)] + [(i, c + k - 1) for k in range(1, r)]
    source = torch.tensor(sources_chosen + sources_rejected, dtype=torch.long, device=input_ids.device)
    return SharedPromptRows(ids, positions, mask, source)
