"""Turn recipe references into objects: the recipe's tokenizer, and a stage's starting model."""

from __future__ import annotations

from ..envs import ALPHABET
from ..models.tokenizer import build_char_tokenizer
from .schema import Recipe


def recipe_tokenizer(recipe: Recipe):
    """The character tokenizer every model built from scratch in this recipe shares."""
    return build_char_tokenizer(recipe.tokenizer.alphabet or ALPHABET)
