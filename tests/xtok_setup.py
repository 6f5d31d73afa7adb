"""Tokenizers and checkpoints of another vocabulary for the cross-tokenizer tests (issue 37, item 4).

The byte-level BPE is the testbed's (`models.tokenizer.build_bpe_tokenizer`), trained on a small fixed sample of
the synthetic domains' prompts and answers (840 texts, 96 tokens): deterministic, and built in well under a second.
"""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from mopd.envs import ALPHABET, get_domain
from mopd.models.checkpoint import save_checkpoint
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_bpe_tokenizer

TINY = TinyModelConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)
CORPUS_DOMAINS = ("addition", "multiplication", "reversal", "sorting", "shift", "caesar", "style")


def synthetic_corpus(per_domain: int = 40, seed: int = 0) -> list[str]:
    """Prompts and answers of the synthetic domains, drawn with a fixed seed."""
    rng = random.Random(seed)
    texts = []
    for name in CORPUS_DOMAINS:
        for p in get_domain(name).sample_train(rng, per_domain):
            texts += [p.prompt, p.answer, p.prompt + p.answer]
    return texts


@cache
def bpe_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    """`models.tokenizer.build_bpe_tokenizer` trained on `synthetic_corpus` (the bytes of ALPHABET, then merges up
    to `vocab_size`). Cached: tokenizers are read-only here."""
    return build_bpe_tokenizer(synthetic_corpus(), ALPHABET, vocab_size)


def save_tiny(path: Path, tokenizer, seed: int, stage: str = "teacher") -> Path:
    """A tiny model of `tokenizer`'s vocabulary, written as a sealed checkpoint directory (what a stage writes)."""
    model = build_tiny_model(TINY, len(tokenizer), tokenizer, seed=seed)
    return save_checkpoint(path, model, tokenizer, {"stage": stage, "kind": "pretrain", "seed": seed})
