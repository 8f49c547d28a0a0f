"""Response embeddings for REAL selection (arXiv 2409.17169): cosine similarity of chosen vs rejected.

An embedding is the mean over a response's tokens of a model's last hidden layer:
  * the policy π_r (selection.real_encoder null): over the exact prompt + response tokens training sees, pooled at
    the response positions, so the prompt conditions each token's state;
  * a sentence encoder (selection.real_encoder = a local directory, e.g. all-MiniLM-L6-v2): the response text alone,
    pooled over its tokens, as sentence-transformers' mean pooling does.
Each distinct response is embedded once, in token-budget batches (margin.batch_size, margin.max_batch_tokens).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from selfplay.backends.batching import token_budget_batches
from selfplay.backends.chat import token_format, training_tokens
from selfplay.backends.modeling import load_causal_lm, load_tokenizer, resolve_model_path
from selfplay.backends.precision import autocast, stage_bf16
from selfplay.core.selection import unique_responses


def _mean_pooled(forward, sequences: list[tuple[list[int], list[int]]], batches: list[list[int]], pad_id: int,
                 device: Any, desc: str, bf16: bool = False) -> np.ndarray:
    """Mean of `forward(ids, mask)`'s hidden states over each sequence's second part (the response)."""
    import torch

    out: np.ndarray | None = None
    bar = tqdm(total=len(sequences), desc=desc, unit="resp", dynamic_ncols=True)
    for idx in batches:
        width = max(len(sequences[i][0]) + len(sequences[i][1]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        pooled = torch.zeros_like(ids, dtype=torch.float32)  # weights of the positions averaged over
        for row, i in enumerate(idx):
            prompt, response = sequences[i]
            ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response, dtype=torch.long)
            mask[row, : len(prompt) + len(response)] = 1
            pooled[row, len(prompt) : len(prompt) + len(response)] = 1.0 / max(len(response), 1)
        with torch.inference_mode():
            with autocast(bf16, device):
                hidden = forward(ids.to(device), mask.to(device))
            means = torch.einsum("bt,bth->bh", pooled.to(device), hidden.float()).cpu().numpy()  # pooling in fp32
        if out is None:
            out = np.zeros((len(sequences), means.shape[1]), dtype=np.float32)
        out[idx] = means
        bar.update(len(idx))
    bar.close()
    return out if out is not None else np.zeros((0, 1), dtype=np.float32)


def response_embeddings(responses: pd.DataFrame, cfg, policy_path, device: Any, desc: str) -> np.ndarray:
    """One embedding per row of `responses` (columns prompt, response), with the configured encoder."""
    encoder = cfg.selection.real_encoder
    if encoder:
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(encoder)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        model = AutoModel.from_pretrained(path, use_safetensors=True,
                                          trust_remote_code=cfg.model.trust_remote_code).to(device).eval()
        limit = min(tokenizer.model_max_length, 512)
        sequences = [([], tokenizer(text, truncation=True, max_length=limit)["input_ids"])
                     for text in responses["response"]]

        def forward(ids, mask):
            return model(input_ids=ids, attention_mask=mask).last_hidden_state
    else:
        tokenizer = load_tokenizer(policy_path, cfg.model.trust_remote_code)
        model = load_causal_lm(policy_path, cfg.model.dtype, device, cfg.model.trust_remote_code)
        sequences = [training_tokens(tokenizer, p, r, token_format(cfg.trainer), cfg.trainer.max_length)
                     for p, r in zip(responses["prompt"], responses["response"], strict=True)]
        backbone = getattr(model, model.base_model_prefix)

        def forward(ids, mask):
            return backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    batches = token_budget_batches([len(p) + len(r) for p, r in sequences], cfg.margin.batch_size,
                                   cfg.margin.max_batch_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return _mean_pooled(forward, sequences, batches, pad, device, desc, bf16=stage_bf16(cfg))


def pair_similarity(pairs: pd.DataFrame, cfg, policy_path, device: Any, desc: str = "REAL embeddings") -> np.ndarray:
    """cos(e_chosen, e_rejected) per pair; each distinct response embedded once."""
    responses = unique_responses(pairs)
    vectors = response_embeddings(responses, cfg, policy_path, device, desc)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.maximum(norms, 1e-12)
    row = {key: i for i, key in enumerate(zip(responses["prompt_id"], responses["sample_idx"], strict=True))}
    chosen = vectors[[row[k] for k in zip(pairs["prompt_id"], pairs["chosen_sample_idx"], strict=True)]]
    rejected = vectors[[row[k] for k in zip(pairs["prompt_id"], pairs["rejected_sample_idx"], strict=True)]]
    return np.sum(chosen * rejected, axis=1).astype(np.float64)
