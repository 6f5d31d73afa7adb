"""The tokenizers of the models a recipe builds from scratch: the recipe's `tokenizer:`, or a pretrain stage's
own (so one recipe holds BPE teacher pipelines beside a character-level student); every stage that descends from
such a model reads its start's (the checkpoint carries it).

Why the BPE's corpus is drawn here: it is the recipe's domains (prompts and answers, as a stage encodes them,
`CORPUS_PER_DOMAIN` of each, from a fixed seed, never a held-out prompt), so the same recipe gives the same
vocabulary on any machine, and the vocabulary fits what the models will read.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping

from ..core.schema import PretrainStage, Recipe, TokenizerSettings
from ..envs import ALPHABET, DomainLike
from ..models.tokenizer import build_bpe_tokenizer, build_char_tokenizer
from .refs import init_ref

# Problems of each domain in a BPE's training corpus: enough that every pair of characters the domains write is
# counted many times (the built-in domains' words are 3-8 letters), and well under a second to draw and train.
CORPUS_PER_DOMAIN = 2000
CORPUS_SEED = "mopd-bpe-corpus"  # a string seeds `random.Random` through SHA-512: the same on every machine


def scratch_origin(recipe: Recipe, name: str) -> str | None:
    """The pretrain stage whose model, built from scratch, `name` descends from (following `init` and a merge's
    `base`); None for a stage that starts from an outside model (or an eval stage)."""
    seen: set[str] = set()
    while name in recipe.stages and name not in seen:  # `seen`: called before the loader refuses cycles
        seen.add(name)
        stage = recipe.stages[name]
        if isinstance(stage, PretrainStage) and stage.model is not None:
            return name
        name = init_ref(stage)
    return None


def tokenizer_settings(recipe: Recipe, name: str) -> TokenizerSettings | None:
    """The tokenizer settings of stage `name`'s model: its scratch origin's own `tokenizer:`, else the recipe's;
    None when it descends from an outside model (whose directory carries its tokenizer)."""
    origin = scratch_origin(recipe, name)
    if origin is None:
        return None
    return recipe.stages[origin].tokenizer or recipe.tokenizer


def scratch_settings(recipe: Recipe) -> list[TokenizerSettings]:
    """Every distinct tokenizer the recipe builds from scratch, in stage order (the recipe's when a pretrain
    stage has no `tokenizer:` of its own)."""
    out: list[TokenizerSettings] = []
    for stage in recipe.stages.values():
        if isinstance(stage, PretrainStage) and stage.model is not None:
            settings = stage.tokenizer or recipe.tokenizer
            if settings not in out:
                out.append(settings)
    return out


def tokenizer_alphabet(settings: TokenizerSettings) -> str:
    """The characters of a tokenizer built from scratch: `printable` names Python's `string.printable` (real
    data), null the domains' `ALPHABET`."""
    if settings.alphabet == "printable":
        return string.printable
    return settings.alphabet or ALPHABET


def vocab_bound(settings: TokenizerSettings) -> int:
    """The most tokens such a tokenizer has, known without building it (a BPE stops early when its corpus has no
    pair left to merge): the memory check's count of embedding rows."""
    if settings.kind == "bpe":
        return settings.vocab_size
    return len(build_char_tokenizer(tokenizer_alphabet(settings)))


def scratch_tokenizer(recipe: Recipe, settings: TokenizerSettings, domains: Mapping[str, DomainLike]):
    """The tokenizer of a model built from scratch with `settings`: characters, or a BPE trained on `bpe_corpus`."""
    alphabet = tokenizer_alphabet(settings)
    if settings.kind == "char":
        return build_char_tokenizer(alphabet)
    return build_bpe_tokenizer(bpe_corpus(recipe, domains), alphabet, settings.vocab_size)


def bpe_corpus(recipe: Recipe, domains: Mapping[str, DomainLike]) -> list[str]:
    """`CORPUS_PER_DOMAIN` training problems of each recipe domain (in the recipe's order), drawn from
    `CORPUS_SEED` without the held-out prompts of `recipe.eval`: each prompt and answer as its own text, as a
    stage encodes them (prompt, then answer)."""
    rng = random.Random(CORPUS_SEED)
    texts: list[str] = []
    for name in recipe.domains:
        domain = domains[name]
        held_out = domain.held_out_prompts(recipe.eval.size, seed=recipe.eval.seed)
        for p in domain.sample_train(rng, CORPUS_PER_DOMAIN, exclude=held_out):
            texts += [p.prompt, p.answer]
    return texts


def tokenizer_identity(recipe: Recipe, settings: TokenizerSettings) -> dict:
    """What of a tokenizer built from scratch enters the identity of the stages that use it: a character
    tokenizer's alphabet (the form identities always had, so finished stages keep theirs), a BPE's settings and
    the domains of its corpus."""
    if settings.kind == "char":
        return settings.model_dump(mode="json", include={"alphabet"})
    return {**settings.model_dump(mode="json"), "corpus": list(recipe.domains)}
