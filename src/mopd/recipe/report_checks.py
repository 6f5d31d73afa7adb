"""Load-time checks of the recipe's blocks that name stages for reporting: `compare:` (`mopd compare`) and
`report:`. Why at load: they are read only after every stage has trained, so a misspelt stage name there would
otherwise cost the whole run before it showed."""

from __future__ import annotations

from typing import Any

from ..core.errors import RecipeError
from ..core.schema import EvalStage, MOPDStage, Recipe
from .yaml_file import Where


def check_compare(recipe: Recipe, where: Where) -> None:
    """The `compare:` block, if any, names training stages of this recipe, and a teacher for every domain."""
    cmp = recipe.compare
    if cmp is None:
        return
    trained = [n for n, s in recipe.stages.items() if not isinstance(s, EvalStage)]

    def need_stage(ref: str, *key: Any) -> None:
        if ref not in trained:
            raise RecipeError(
                f"{where('compare', *key)}: {ref!r} is not a training stage of this recipe; stages are: "
                f"{', '.join(trained)}"
            )

    need_stage(cmp.start, "start")
    for d, t in cmp.teachers.items():
        if d not in recipe.domains:
            raise RecipeError(f"{where('compare', 'teachers', d)}: domain {d!r} is not in the recipe's `domains`")
        need_stage(t, "teachers", d)
    for d in recipe.domains:
        if d not in cmp.teachers:
            raise RecipeError(f"{where('compare', 'teachers')}: domain {d!r} has no teacher")
    for label, stage in cmp.methods.items():
        need_stage(stage, "methods", label)
    for i, label in enumerate(cmp.curves or []):
        if label not in cmp.methods:
            raise RecipeError(
                f"{where('compare', 'curves', i)}: {label!r} is not a method; methods are: {', '.join(cmp.methods)}"
            )


def check_report_student(recipe: Recipe, where: Where) -> None:
    """`report.student`, if given, is a mopd stage: the summary scores a distilled student."""
    if recipe.report.student is not None and not isinstance(recipe.stages.get(recipe.report.student), MOPDStage):
        raise RecipeError(f"{where('report', 'student')}: {recipe.report.student!r} is not a mopd stage")
