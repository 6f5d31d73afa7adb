"""`mopd compare` and `mopd sweep`: run every method / point (for every seed), then write the tables even where
some failed.

Why keep going: a comparison is eight independent experiments per seed, a sweep a grid of them; one refused
method (a round-2 teacher gate) or diverged point should leave a hole in the table, not lose the others and the
other seeds. The failures are collected, one line each (prefixed with the variant's directory), for the command
to print after the table and exit non-zero; a rerun skips everything finished and retries only what failed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from ..core.errors import StageError
from ..recipe.compare import compare_plan
from ..recipe.load import LoadedRecipe
from ..recipe.runner import run_recipe
from ..recipe.sweep import compare_seeds
from ..report.compare import build_compare


def collecting(out: Path, console: Console, failures: list[str]) -> Callable[[LoadedRecipe, Path], None]:
    """A run function for `recipe.sweep`: runs one variant; its failed stages go to `failures`, prefixed with the
    variant's directory under `out`. Run-directory errors (locked, unwritable) are not StageErrors and still end
    the command."""

    def run_one(one: LoadedRecipe, run_dir: Path) -> None:
        try:
            run_recipe(one, run_dir, console)
        except StageError as e:
            where = run_dir.relative_to(out) if run_dir.is_relative_to(out) else run_dir
            prefix = "" if str(where) == "." else f"{where}: "
            failures.extend(prefix + line for line in str(e).splitlines())

    return run_one


def run_compare(loaded: LoadedRecipe, out: Path, seeds: int, console: Console) -> tuple[dict[str, Any], list[str]]:
    """(what compare.json holds, one line per failed stage). A stage that fails stops its dependants only; a seed
    whose run fails goes on to the next."""
    failures: list[str] = []
    run_one = collecting(out, console, failures)
    if seeds > 1:
        return compare_seeds(loaded, out, seeds, run_one), failures
    run_one(loaded, out)
    return build_compare(out, compare_plan(loaded)), failures
