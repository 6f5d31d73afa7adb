"""Tokenizers and checkpoints of another alphabet for the cross-tokenizer tests (issue 37, item 4).

The byte-level BPE here stands in for `models.tokenizer.build_bpe_tokenizer` until that lands: trained with the
`tokenizers` library on the synthetic domains' prompts and answers, small (a few hundred texts, 96 tokens) and
deterministic (the BPE trainer numbers its symbols in sorted order, breaks ties by id, and counts integers, so the
same texts give the same merges whatever the thread count).
"""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mopd.envs import ALPHABET, get_domain
from mopd.models.checkpoint import save_checkpoint
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK

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
    """A byte-level BPE trained on `synthetic_corpus`: the four special tokens of the character tokenizer (other
    ids), the bytes of ALPHABET, then merges up to `vocab_size`. Cached: tokenizers are read-only here."""
    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    alphabet = "".join(piece for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
                       .pre_tokenize_str(ALPHABET))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=sorted(set(alphabet)), show_progress=False)
    core.train_from_iterator(synthetic_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, padding_side="left", clean_up_tokenization_spaces=False)


def save_tiny(path: Path, tokenizer, seed: int, stage: str = "teacher") -> Path:
    """A tiny model of `tokenizer`'s vocabulary, written as a sealed checkpoint directory (what a stage writes)."""
    model = build_tiny_model(TINY, len(tokenizer), tokenizer, seed=seed)
    return save_checkpoint(path, model, tokenizer, {"stage": stage, "kind": "pretrain", "seed": seed})
