"""`mopd validate`: every load-time check of a recipe, and nothing that computes.

Why: `mopd run` already refuses a bad recipe before compute, but only on the way to running it; validating in an
editor loop or in CI should neither train nor create a run directory. `load_recipe` is the whole check (YAML,
schema, plugins, domains, references, cycles, teachers, tokenizers), so this is that plus a one-line summary.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..recipe.load import LoadedRecipe, load_recipe


def recipe_summary_line(loaded: LoadedRecipe) -> str:
    """`ok: FILE: N stages (kind counts), domains ..., order a -> b -> ...`."""
    recipe = loaded.recipe
    kinds = Counter(recipe.stages[n].kind for n in loaded.order)
    counts = ", ".join(f"{k} {c}" for k, c in kinds.items())
    n = len(loaded.order)
    return (f"ok: {loaded.path}: {n} stage{'s' if n != 1 else ''} ({counts}); "
            f"domains {', '.join(recipe.domains)}; order {' -> '.join(loaded.order)}")


def validate_recipe(path: Path) -> str:
    """The summary line of a recipe that passes every load-time check, after its warnings (`warning: ...`, one
    line each); raises `RecipeError` (one line) if not."""
    loaded = load_recipe(Path(path))
    return "\n".join([*(f"warning: {w}" for w in loaded.warnings), recipe_summary_line(loaded)])
