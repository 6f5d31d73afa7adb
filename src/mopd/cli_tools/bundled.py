"""The recipes and the recipe JSON schema shipped inside the package.

Why a shipped schema file: each bundled recipe's first line points yaml-language-server editors at it
(`# yaml-language-server: $schema=recipe.schema.json`, relative to the recipe), so they complete keys and flag
mistakes as the recipe is typed. `mopd schema` prints the same text, and a test keeps the file equal to it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA_FILE = "recipe.schema.json"
SCHEMA_COMMENT = f"# yaml-language-server: $schema={SCHEMA_FILE}"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


# One recipe per post-training report, each on the tiny models and the same start (docs/RECIPES.md), in the
# order of docs/RECIPES.md's table; `benchmarks/recipes_table.py` runs them, the suite runs them at a small scale.
REPORT_RECIPES = ("instructgpt", "llama2", "llama3", "tulu3", "olmo3", "r1_zero", "r1", "deepseek_v32",
                  "mai_thinking", "glm5", "mimo_v2_flash", "nemotron3_ultra")


def recipes_dir() -> Path:
    return Path(str(resources.files("mopd") / "recipes"))


def bundled_recipe(name: str) -> Path:
    return recipes_dir() / f"{name}.yaml"


def recipe_json_schema() -> dict[str, Any]:
    """The JSON schema of a recipe file (pydantic's, of `core.schema.Recipe`), with its dialect named."""
    from ..core.schema import Recipe  # here, not at import: `mopd --help` and completion stay fast

    schema = Recipe.model_json_schema()
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def schema_text() -> str:
    """The schema as `mopd schema` prints it and `recipes/recipe.schema.json` holds it."""
    return json.dumps(recipe_json_schema(), indent=2) + "\n"


def shipped_schema_path() -> Path:
    return recipes_dir() / SCHEMA_FILE


def recipe_summary(path: Path) -> str:
    """A recipe's first comment line (its one-line description), the schema comment skipped."""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            if stripped:
                break
            continue
        text = stripped.lstrip("#").strip()
        if text and not text.startswith("yaml-language-server:"):
            return text
    return ""


def bundled_recipes() -> dict[str, str]:
    """{name: first comment line} of every bundled recipe, by name."""
    return {p.stem: recipe_summary(p) for p in sorted(recipes_dir().glob("*.yaml"))}


def run_bundled(names: list[str], root: Path, run: Callable[[Any, Path], Any], scale: float | None = None,
                earlier: Sequence[Path] = ()) -> dict[str, Path]:
    """Run bundled recipes by name, each into ROOT/<name> (at `scale`, if given), with `run(loaded, out)`.

    Why together: the report recipes share their start (base, sft) and some their teachers, stage for stage, so
    each stage whose identity a recipe run earlier finished is linked, not trained again (`experiments.variants`).
    `earlier`: run directories of recipes run before, whose finished stages may be linked too. Returns {name: run
    directory}."""
    from ..experiments.variants import Variant, finished_stages, link_shared_stages
    from ..recipe.load import load_recipe
    from .scaled import with_scale

    dirs: dict[str, Path] = {}
    for name in names:
        out = Path(root) / name
        loaded = load_recipe(bundled_recipe(name))
        if scale is not None:
            loaded = with_scale(loaded, scale, out)
        out.mkdir(parents=True, exist_ok=True)
        link_shared_stages(Variant(name, {}, loaded.recipe.seed, out, loaded),
                           finished_stages([d for d in [*earlier, *dirs.values()] if d.exists()]))
        run(loaded, out)
        dirs[name] = out
    return dirs
