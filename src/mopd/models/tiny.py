"""Tiny causal LMs built from a small config: the embedded default that runs a whole recipe on a laptop CPU.

They are ordinary `transformers` Qwen3 / Llama models, so every checkpoint opens with `AutoModelForCausalLM`
and the same recipe code path later runs on real Hugging Face checkpoints.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

from ..core.schema import TinyModelConfig


def build_tiny_model(cfg: TinyModelConfig, vocab_size: int, tokenizer, seed: int) -> PreTrainedModel:
    """A randomly initialised model of the given shape; the seed makes the initial weights reproducible."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    if cfg.arch == "qwen3":
        config = Qwen3Config(head_dim=cfg.hidden_size // cfg.heads, **common)
        model = Qwen3ForCausalLM(config)
    else:
        config = LlamaConfig(head_dim=cfg.hidden_size // cfg.heads, **common)
        model = LlamaForCausalLM(config)
    return model
