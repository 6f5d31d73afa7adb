"""Tokenizers of the tiny models built from scratch, as Hugging Face `PreTrainedTokenizerFast`s: one token per
character (the default), or a small byte-level BPE.

Why characters: the synthetic domains are arithmetic and string manipulation, where a sub-word vocabulary would
hide the structure the tiny models must learn, and a fixed alphabet keeps every model in a recipe on the same
vocabulary, which on-policy distillation needs (teacher and student score the same token ids).

Why a BPE as well: teachers of another model family have another tokenizer. A byte-level BPE (the GPT-2 / SmolLM2
kind: the ByteLevel pre-tokenizer and decoder over a BPE model) trained on the recipe's own domains gives tiny
teachers whose token boundaries differ from the character student's, the testbed of cross-tokenizer
distillation (docs/CROSS_TOKENIZER.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet`, after the four special tokens (ids 0..3)."""
    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # `[\s\S]`, not `.`: a dot skips newlines, so "\n\n" would become one unknown token
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return _fast(core)


def build_bpe_tokenizer(texts: Iterable[str], alphabet: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most `vocab_size` tokens (the four special tokens at ids 0..3, then the bytes of
    `alphabet` and of `texts`, then the merges learned from `texts`), left-padded like the character tokenizer.

    Deterministic: `tokenizers`' BPE trainer numbers the initial symbols in sorted order and, among pairs of equal
    count, merges the one of the smallest ids first, and its counts are integers; so the same `texts` give the same
    vocabulary and merges whatever the thread count or hash seed (tests/test_bpe_tokenizer.py runs it twice in
    processes that differ in both). Only the bytes seen (in `alphabet` or `texts`) enter the vocabulary, not all
    256, so a small `vocab_size` still leaves room for merges; any other character reads as `<unk>`.
    """
    core = Tokenizer(models.BPE(unk_token=UNK))
    # no prefix space: a prompt is encoded as it is written, as the character tokenizer encodes it
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=sorted(set(byte_level_symbols(alphabet))),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    return _fast(core)


def byte_level_symbols(text: str) -> str:
    """`text`'s UTF-8 bytes as the printable symbols a byte-level BPE's vocabulary spells them with (space: Ġ)."""
    table = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return "".join(piece for piece, _ in table.pre_tokenize_str(text))


def _fast(core: Tokenizer) -> PreTrainedTokenizerFast:
    """Both kinds with the same special tokens and left padding (the samplers pad prompts on the left)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary, the merges of a BPE and the special tokens: equal fingerprints mean
    interchangeable token ids (a BPE's merges decide which ids a text becomes, so two with one vocabulary but
    other merges differ; a tokenizer without merges hashes as it always did)."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    if merges := _merges(tokenizer):
        payload["merges"] = merges
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _merges(tokenizer) -> list:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return []
    return json.loads(backend.to_str()).get("model", {}).get("merges") or []
