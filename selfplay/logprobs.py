"""Teacher-forced log-probabilities of completions, through TRL's fused LM head (the forward TRL's own reference
pass runs: no full-vocabulary logits tensor is kept), in the token-budget batches it is given, each sequence once."""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm


def completion_logps(model: Any, sequences: list[tuple[list[int], list[int]]], device: Any,
                     batches: list[list[int]], pad_token_id: int, desc: str = "log-probs",
                     bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sum of log π(y_t | x, y_<t) over each completion at temperature 1, and its token count.

    `sequences` holds (prompt_ids, completion_ids) pairs; `batches` lists the indices each forward pass takes
    (selfplay/batching.py); rows in no batch stay 0. An empty completion gets sum 0 and count 0. `bf16` runs the
    forward under bf16 autocast, as the trainer does with `trainer.bf16`, so reused reference log-probs match.
    """
    import torch
    from trl.trainer.utils import add_fused_lm_head

    if not getattr(model, "_selfplay_fused_head", False):
        add_fused_lm_head(model)
        model._selfplay_fused_head = True
    sums = np.zeros(len(sequences))
    counts = np.array([len(c) for _, c in sequences])
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
        with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                        use_cache=False, fused_lm_head=True)
        sums[idx] = out.log_probs.float().sum(dim=1).cpu().numpy()
        bar.update(sum(lengths))
    bar.close()
    return sums, counts
