"""`mopd run RECIPE --scale S`: the recipe with `scale: S`, written into its run directory and loaded from there.

Why a file and not an in-memory change: the run directory's recipe.yaml then says the run was scaled (a rerun
or `mopd report` of that directory reads the same recipe), and the scaled recipe passes exactly the loader's
checks (`recipe.reduced_scale` applies the factor at load). Relative paths are made absolute first, as for sweep
variants (`experiments.variants.portable`), since the copy lives away from the original's folder.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path

import yaml

from ..core.run_dir import RECIPE_COPY
from ..experiments.variants import portable
from ..recipe.load import LoadedRecipe, RecipeError, load_recipe
from ..recipe.reduced_scale import scaled_run_dir


def default_run_dir(name: str, scale: float) -> Path:
    """runs/<name>, or runs/<name>-scale<s> for a scaled recipe: a scaled run never lands in the full one's."""
    return Path("runs") / scaled_run_dir(name, scale)


def with_scale(loaded: LoadedRecipe, scale: float, out: Path) -> LoadedRecipe:
    """`loaded` at `scale`, checked by the loader (a bad scale is one line naming --scale) before anything is
    written, then written as OUT/recipe.yaml, which the returned recipe points at."""
    raw = portable(yaml.safe_load(loaded.path.read_text()), loaded)
    raw["scale"] = scale
    text = yaml.safe_dump(raw, sort_keys=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / RECIPE_COPY
        path.write_text(text)
        try:
            scaled = load_recipe(path)
        except RecipeError as e:
            why = re.sub(rf"^{re.escape(str(path))}(:\d+)?: ", "", str(e))
            raise RecipeError(f"--scale {scale:g}: {why}") from None
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_COPY).write_text(text)
    return dataclasses.replace(scaled, path=out / RECIPE_COPY)
