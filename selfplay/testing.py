"""Tiny random models on a real tokenizer, for tests and device checks (nothing downloaded, seconds to build)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def _llama_config(tokenizer: Any, hidden: int, layers: int, **extra: Any) -> Any:
    from transformers import LlamaConfig

    heads = max(4, hidden // 64)
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       head_dim=hidden // heads, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=True, **extra)


def make_policy(tokenizer: Any, out: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random Llama causal LM saved as safetensors with the tokenizer (and its chat template)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(_llama_config(tokenizer, hidden, layers)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_reward_model(tokenizer: Any, out: Path, hidden: int = 32, layers: int = 2, seed: int = 1) -> Path:
    """A random 1-label sequence classifier. Its pad token is <|endoftext|>, not the <|im_end|> that ends every chat
    turn, so the classifier reads the true last token of each conversation."""
    import torch
    from transformers import LlamaForSequenceClassification

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = "<|endoftext|>"
    torch.manual_seed(seed)
    config = _llama_config(tokenizer, hidden, layers, num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
