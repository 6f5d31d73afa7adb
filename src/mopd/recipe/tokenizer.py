"""Turn recipe references into objects: the recipe's tokenizer, and a stage's starting model."""

from __future__ import annotations

import string

from ..core.schema import Recipe
from ..envs import ALPHABET
from ..models.tokenizer import build_char_tokenizer


def tokenizer_alphabet(recipe: Recipe) -> str:
    """The characters of the recipe's tokenizer: `printable` names Python's `string.printable` (real data)."""
    alphabet = recipe.tokenizer.alphabet
    if alphabet == "printable":
        return string.printable
    return alphabet or ALPHABET


def recipe_tokenizer(recipe: Recipe):
    """The character tokenizer every model built from scratch in this recipe shares."""
    return build_char_tokenizer(tokenizer_alphabet(recipe))
