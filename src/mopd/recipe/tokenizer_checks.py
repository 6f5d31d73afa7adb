"""Load-time tokenizer agreement: a teacher must score the student's token ids, and merged models must share one
vocabulary. Reads tokenizer files only (no weights); a Hub id not in the local cache is checked when its stage
starts, since validation never downloads."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import RecipeError
from ..core.schema import (
    DPOStage,
    MergeStage,
    MOPDStage,
    PPOStage,
    PretrainStage,
    Recipe,
    RewardModelReward,
    reward_of,
    reward_parts,
)
from ..models.tokenizer import SPECIAL_TOKENS, byte_level_symbols, tokenizer_fingerprint
from .refs import resolve_external, stage_roots
from .tokenizer import scratch_tokenizer, tokenizer_alphabet, tokenizer_settings
from .yaml_file import Where

if TYPE_CHECKING:
    from .load import LoadedRecipe


def check_bpe_room(recipe: Recipe, where: Where) -> None:
    """A BPE's `vocab_size` must leave room for merges past its four special tokens and its alphabet's symbols
    (the trainer keeps them all whatever the size): at or below that it would be a character tokenizer spelt in
    bytes, not what the recipe asked for."""
    places = [(("tokenizer",), recipe.tokenizer)] + [
        (("stages", name, "tokenizer"), s.tokenizer) for name, s in recipe.stages.items()
        if isinstance(s, PretrainStage) and s.tokenizer is not None
    ]
    for key, settings in places:
        if settings.kind != "bpe":
            continue
        floor = len(SPECIAL_TOKENS) + len(set(byte_level_symbols(tokenizer_alphabet(settings))))
        if settings.vocab_size <= floor:
            raise RecipeError(f"{where(*key, 'vocab_size')}: {settings.vocab_size} tokens leave no room for merges: "
                              f"the special tokens and the alphabet's symbols are {floor} already; set it above")


def offline_fingerprint(ref: str) -> str | None:
    """Tokenizer fingerprint of a model directory or a Hub id already in the local cache; None when only the
    Hub has it (validation never downloads). A local directory whose tokenizer cannot load raises."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(ref), local_files_only=True)
    except Exception:
        if Path(ref).is_dir():
            raise
        return None
    return tokenizer_fingerprint(tok)


def tokenizer_fingerprints(loaded: LoadedRecipe) -> dict[str, str | None]:
    """Fingerprint of the tokenizer every model reference in the recipe will carry (cheap: no weights; None for
    a Hub id that is not in the local cache, since validation never downloads). A model built from scratch carries
    its pretrain stage's tokenizer (`recipe.tokenizer.tokenizer_settings`), built here as that stage will build it."""
    recipe = loaded.recipe
    cache: dict[str, str | None] = {}

    def of_stage(name: str, root: str) -> str | None:
        settings = tokenizer_settings(recipe, name) if root == "scratch" else None
        key = settings.model_dump_json() if settings is not None else root
        if key not in cache:
            cache[key] = (tokenizer_fingerprint(scratch_tokenizer(recipe, settings, loaded.domains))
                          if settings is not None else offline_fingerprint(root))
        return cache[key]

    roots = stage_roots(recipe.stages, loaded.order, loaded.path.parent)
    return {name: of_stage(name, root) for name, root in roots.items()}


def _shared_vocabulary(stage) -> list[tuple[tuple, str]]:
    """(key path, model) of every model that must read the stage's own token ids: a MOPD stage's teachers, a
    merge's models, a DPO stage's explicit reference, a PPO stage's reference and critic, a reward model."""
    return _teachers_or_models(stage) + _policy_side(stage)


def _policy_side(stage) -> list[tuple[tuple, str]]:
    """A reward model (the stage's `reward`) and a PPO stage's reference and critic: models of the policy's
    vocabulary."""
    refs = [((k,), getattr(stage, k)) for k in ("reference", "critic") if isinstance(stage, PPOStage) and getattr(stage, k)]
    if isinstance(stage, DPOStage) and stage.reference is not None:
        refs.append((("reference",), stage.reference))
    for key, _, source in reward_parts(reward_of(stage)):
        if isinstance(source, RewardModelReward):
            refs.append((("reward", *key, "reward_model"), source.reward_model))
    return refs


def _teachers_or_models(stage) -> list[tuple[tuple, str]]:
    if isinstance(stage, MOPDStage):  # a teacher scored in its own tokens may have another tokenizer
        return [(("teachers", d), t) for d, t in stage.teachers.items() if t not in stage.cross_tokenizer]
    if isinstance(stage, MergeStage):
        return [(("models", i), m) for i, m in enumerate(stage.models)]
    return []


def check_tokenizer_agreement(loaded: LoadedRecipe) -> None:
    """A teacher (a DPO reference) must score the student's (the policy's) token ids, and merged models must share
    one vocabulary: refuse any whose tokenizer differs from the student's (the merge base's, the policy's). A MOPD
    teacher listed in the stage's `cross_tokenizer` may differ: that is what it opted into (it is scored on the
    rollouts' text, docs/CROSS_TOKENIZER.md), whatever the objective."""
    recipe = loaded.recipe
    if not any(_shared_vocabulary(s) for s in recipe.stages.values()):
        return
    fps = tokenizer_fingerprints(loaded)
    for name, stage in recipe.stages.items():
        student_fp = fps.get(name)
        for key, teacher in _shared_vocabulary(stage):
            if teacher in recipe.stages:
                fp = fps[teacher]
            else:
                ref = resolve_external(teacher, loaded.path.parent) or teacher
                try:
                    fp = offline_fingerprint(ref)
                except Exception as e:
                    raise RecipeError(
                        f"{loaded.where('stages', name, *key)}: cannot load the tokenizer of {teacher!r}: {e}"
                    ) from None
            if fp is None or student_fp is None or fp == student_fp:
                continue  # None: a Hub id not cached here (validation never downloads); checked when the stage starts
            if isinstance(stage, MergeStage):
                raise RecipeError(
                    f"{loaded.where('stages', name, *key)}: {teacher!r} uses a different tokenizer from the "
                    f"base {stage.base!r}; merging parameters needs the same vocabulary"
                )
            if key[0] in ("reward", "critic") or isinstance(stage, PPOStage):
                role = {"reward": "reward model", "critic": "critic"}.get(key[0], key[0])
                raise RecipeError(
                    f"{loaded.where('stages', name, *key)}: {role} {teacher!r} uses a different tokenizer from "
                    f"the policy {stage.init!r}; it would score the policy's token ids as its own"
                )
            if isinstance(stage, DPOStage):
                raise RecipeError(
                    f"{loaded.where('stages', name, *key)}: reference {teacher!r} uses a different tokenizer from "
                    f"the policy {stage.init!r}; it would score the policy's token ids as its own"
                )
            raise RecipeError(
                f"{loaded.where('stages', name, *key)}: teacher {teacher!r} uses a different "
                f"tokenizer from the student {stage.init!r}; on-policy distillation needs the same vocabulary "
                f"(or the teacher's opt-in to cross-tokenizer scoring: {{stage: {teacher}, cross_tokenizer: true}})"
            )
