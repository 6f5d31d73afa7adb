"""`mopd compare` and `mopd sweep`: run every method / point (for every seed), then write the tables even where
some failed.

Why keep going: a comparison is eight independent experiments per seed, a sweep a grid of them; one refused
method (a round-2 teacher gate) or diverged point should leave a hole in the table, not lose the others and the
other seeds. Each variant's run returns its failures, one line each (prefixed with the variant's directory), for
the command to print after the table and exit non-zero; a rerun skips everything finished and retries only what
failed. The run function is a plain module-level function (with its run directory bound), so that the Ray
executor can send it to a worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console

from ..core.errors import StageError
from ..execution.runner import run_recipe
from ..experiments.compare_plan import compare_plan
from ..experiments.sweep import compare_seeds, sweep
from ..experiments.variants import Executor, RunFn, run_in_order
from ..recipe.load import LoadedRecipe
from ..report.compare import build_compare


def run_and_collect(one: LoadedRecipe, run_dir: Path, out: Path, **stage_executor: Any) -> list[str]:
    """Run one variant (`stage_executor`: run_recipe's executor, address, threads); returns one line per failed
    stage, prefixed with the variant's directory under `out`. Run-directory errors (locked, unwritable) are not
    StageErrors and still end the command."""
    try:
        run_recipe(one, run_dir, Console(), **stage_executor)
    except StageError as e:
        here = Path(run_dir).resolve()
        where = here.relative_to(out) if here.is_relative_to(out) else run_dir
        prefix = "" if str(where) == "." else f"{where}: "
        return [prefix + line for line in str(e).splitlines()]
    return []


def collecting(out: Path) -> RunFn:
    """`run_and_collect` for the variants under `out`."""
    return partial(run_and_collect, out=Path(out).resolve())


def _lines(outcomes: Sequence[Any]) -> list[str]:
    return [line for lines in outcomes if lines for line in lines]


def variants_executor(console: Console, executor: str | None, address: str | None,
                      threads: int | None) -> Executor:
    """How `--executor` runs the variants: local, one after another; ray, in parallel (`experiments.variants_ray`),
    with Ray's absence one StageError line before anything is planned."""
    if executor != "ray":
        return run_in_order
    from ..execution.ray_executor import import_ray
    from ..experiments.variants_ray import ray_executor

    import_ray()
    return ray_executor(console, address, threads)


def run_compare(loaded: LoadedRecipe, out: Path, seeds: int, executor: Executor = run_in_order,
                one_seed: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """(what compare.json holds, one line per failed stage). A stage that fails stops its dependants only; a seed
    whose run fails goes on to the next. Seeds run through `executor`; one seed runs its stages as `one_seed`
    says (run_recipe's executor, address, threads: with ray, the methods at the same time)."""
    run_one = collecting(out)
    if seeds > 1:
        result, outcomes = compare_seeds(loaded, out, seeds, run_one, executor)
        return result, _lines(outcomes)
    failures = run_one(loaded, out, **(one_seed or {}))
    return build_compare(out, compare_plan(loaded)), failures


def run_sweep(loaded: LoadedRecipe, out: Path, assignments: Sequence[str], seeds: int,
              executor: Executor = run_in_order) -> tuple[dict[str, Any], list[str]]:
    """(what sweep.json holds, one line per failed stage): a failed point is a hole in the table."""
    result, outcomes = sweep(loaded, out, assignments, seeds, collecting(out), executor)
    return result, _lines(outcomes)
