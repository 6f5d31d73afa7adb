"""`mopd compare --seeds N` and `mopd sweep`: plan every variant (checked before any compute), run them one after
another (or, with the Ray executor, in parallel) through `experiments.variants`, then write the reports.

Layout: `compare --seeds N` runs seed s into RUN/seed-<s>/ (each a complete run directory with its own
compare.md) and writes the combined compare.md/json in RUN. `sweep` runs point p, seed s into
RUN/<p>/seed-<s>/ (RUN/<p>/ with one seed), and writes sweep.md/json and sweep_<key>.png in RUN. A point's name
is its settings as typed (`student.lr=1e-4__student.objective=sampled`), so a rerun finds the same directories:
finished stages are skipped, and an interrupted point resumes. A directory swept several times (new keys, new
values) also gets sweep_all.md/json: every point found under RUN, whichever invocation ran it, scored the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import RecipeError
from ..core.run_dir import RECIPE_COPY
from ..core.schema import MOPDStage
from ..core.schema.bounds import SEEDS_MAX
from ..execution.runner import report_block
from ..recipe.load import LoadedRecipe
from ..recipe.yaml_file import read_yaml
from ..report.compare import build_compare
from ..report.sweep import build_sweep, build_sweep_history
from .compare_plan import compare_plan
from .variants import (
    Executor,
    RunFn,
    Variant,
    earlier_runs,
    parse_grid,
    plan_variants,
    point_settings,
    run_in_order,
    run_variants,
    sweep_points,
)


def seed_count(option: int | None, loaded: LoadedRecipe) -> int:
    """`--seeds` if given, else the recipe's `seeds`; below 1 is a one-line RecipeError."""
    n = loaded.recipe.seeds if option is None else option
    if not 1 <= n <= SEEDS_MAX:
        raise RecipeError(f"--seeds {n}: must be from 1 to {SEEDS_MAX} (each seed is a whole run of every method)")
    return n


def compare_seeds(loaded: LoadedRecipe, out: Path, seeds: int, run: RunFn,
                  executor: Executor = run_in_order) -> tuple[dict[str, Any], list[Any]]:
    """Run every method for `seeds` seeds (variants planned and checked first) and write each seed's comparison
    and the combined one; returns the combined compare.json and each seed's `run` result."""
    plan = compare_plan(loaded)
    variants = plan_variants(loaded, out, seeds)
    outcomes = run_variants(variants, run, executor, earlier_runs(out))
    for v in variants:
        build_compare(v.out, plan)
    return build_compare(out, plan, [v.out for v in variants]), outcomes


def _sweep_plan(variant: Variant) -> dict[str, Any]:
    """What a point scores: the normalized score of the recipe's report student (start = its init, teachers =
    its teachers), and the student's objective (the best setting is named per objective)."""
    block = report_block(variant.loaded)
    if block is None:
        raise RecipeError(f"{variant.loaded.path}: no mopd stage: a sweep scores the report's student")
    stage = variant.loaded.recipe.stages[block["student"]]
    return {"start": block["start"], "teachers": block["teachers"], "student": block["student"],
            "objective": getattr(stage, "objective", None), "min_teacher_gain": block["min_teacher_gain"]}


def sweep(loaded: LoadedRecipe, out: Path, assignments: Sequence[str], seeds: int, run: RunFn,
          executor: Executor = run_in_order) -> tuple[dict[str, Any], list[Any]]:
    """Run the grid of `--set` values x seeds (every variant checked first) and write sweep.md, sweep.json and
    one sweep_<key>.png per key; returns sweep.json and each variant's `run` result."""
    grid = parse_grid(assignments)
    variants = plan_variants(loaded, out, seeds, grid)
    plans = {id(v): _sweep_plan(v) for v in variants}  # before any compute: every point has a student
    outcomes = run_variants(variants, run, executor, earlier_runs(out))
    points: dict[str, dict[str, Any]] = {}
    for v in variants:
        p = points.setdefault(v.name, {"name": v.name, "settings": dict(v.texts), "seed_dirs": [],
                                       **plans[id(v)]})
        p["seed_dirs"].append(str(v.out.relative_to(out)))
    result = build_sweep(out, {"recipe": loaded.recipe.name, "keys": [k for k, _ in grid],
                               "values": {k: texts for k, texts in grid},
                               "seeds": sorted({v.seed for v in variants}), "points": list(points.values())})
    sweep_history(out, loaded.recipe.name, plans[id(variants[0])], scored=result["points"])
    return result, outcomes


def _objective_in(run_dir: Path, student: str) -> str | None:
    """The student's objective as a point's own recipe.yaml sets it (read as data: nothing in it is run; a run
    directory is untrusted, so the copy is read with the recipe loader's guard against alias bombs and nesting)."""
    try:
        _, raw = read_yaml(run_dir / RECIPE_COPY)
        value = raw["stages"][student].get("objective", MOPDStage.model_fields["objective"].default)
    except (RecipeError, KeyError, TypeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def sweep_history(out: Path, recipe: str, plan: dict[str, Any],
                  scored: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Write sweep_all.md/json over every point under `out` (`variants.sweep_points`), scored against `plan`'s
    start, teachers and student (the recipe's: a point changes settings, not the stages' names). `scored`: points
    this invocation already scored (`build_sweep`), reused rather than scored again."""
    points = []
    for name, dirs in sweep_points(out).items():
        points.append({**plan, "name": name, "settings": point_settings(name),
                       "seed_dirs": [str(d.relative_to(out)) for d in dirs],
                       "objective": _objective_in(dirs[0], plan["student"]) or plan["objective"]})
    return build_sweep_history(out, {"recipe": recipe, "points": points}, scored)
