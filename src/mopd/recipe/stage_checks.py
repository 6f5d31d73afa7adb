"""Load-time checks of each stage against the rest of the recipe: its name, what it refers to, the domains it
names, its teachers and their snapshots. Each mistake is one RecipeError line at the offending key.

Why here and not in the schema: a stage's own rules (a linear schedule needs an end temperature) are validators
on its model in `core.schema`; these need what the stage alone cannot see: the recipe's domains, the other
stages, the disk and the installed packages.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..core.errors import RecipeError
from ..core.run_dir import DERIVED_NAME_EXTRA, NAME_MAX, reserved_stage_name
from ..core.schema import NAME_PATTERN, CascadeRLStage, MOPDStage, OffPolicyFTStage, Recipe, SamplingSettings
from ..core.schema.teachers import missing_extra
from .refs import StageFacts, check_stage_refs
from .yaml_file import Where


def check_stage_names(recipe: Recipe, base: Path, where: Where) -> None:
    """A stage name becomes a directory of the run: no path, no hidden or option-like name, none of the names
    the run directory uses for its own files, and short enough that every name mopd derives from it fits the
    filesystem (`base`: the recipe's directory, the run directory's stand-in at load)."""
    longest = name_max(base) - DERIVED_NAME_EXTRA
    if len(recipe.name) > longest:
        raise RecipeError(f"{where('name')}: the recipe name is {len(recipe.name)} characters; at most {longest} "
                          "here (it names the run directory, and file names on this filesystem are at most "
                          f"{longest + DERIVED_NAME_EXTRA})")
    for name in recipe.stages:
        if not re.fullmatch(NAME_PATTERN, name):
            raise RecipeError(
                f"{where('stages', name)}: stage name {name!r} is not allowed: use letters, digits, '_', '-' and '.', "
                "starting with a letter, digit or '_' (it names the stage's directory in the run)"
            )
        if taken := reserved_stage_name(name):
            raise RecipeError(
                f"{where('stages', name)}: stage name {name!r} is taken: the run directory keeps its own {taken!r} "
                "beside the stages' directories; choose another name"
            )
        if len(name) > longest:
            raise RecipeError(
                f"{where('stages', name)}: stage name {name[:24]!r}... is {len(name)} characters; at most {longest} "
                f"here (file names on this filesystem are at most {longest + DERIVED_NAME_EXTRA}, and mopd adds up "
                f"to {DERIVED_NAME_EXTRA} to a stage's name)"
            )


def name_max(directory: Path) -> int:
    """The longest file name the filesystem of `directory` (or its nearest existing parent) takes, at most
    NAME_MAX."""
    for d in (directory, *directory.parents):
        try:
            return min(NAME_MAX, os.pathconf(d, "PC_NAME_MAX"))
        except (OSError, ValueError):
            continue
    return NAME_MAX


def check_stage(recipe: Recipe, name: str, facts: StageFacts, base: Path, where: Where, *, check_hub: bool) -> list[str]:
    """Stage `name`'s references (`refs.check_stage_refs`), then the domains it names, its teachers, its domain
    weights; returns the stages it depends on. `base`: the recipe's directory; `where(*key)` locates a key."""
    at = lambda *key: where("stages", name, *key)  # noqa: E731
    stage = recipe.stages[name]
    deps = check_stage_refs(recipe, name, facts.refs, base, at, check_hub=check_hub)
    _check_domains_known(recipe, stage, at)
    if isinstance(stage, MOPDStage | OffPolicyFTStage):
        _check_teachers(recipe, stage, at)
    if isinstance(stage, SamplingSettings):
        _check_domain_weights(stage, list(facts.domains), at)
    return deps


def _check_domains_known(recipe: Recipe, stage: Any, at: Where) -> None:
    """A stage's `domains` (a cascade's `order`) are domains of the recipe."""
    for i, d in enumerate(getattr(stage, "domains", None) or []):
        if d not in recipe.domains:
            raise RecipeError(f"{at('domains', i)}: domain {d!r} is not in the recipe's `domains`")
    for i, d in enumerate(stage.order if isinstance(stage, CascadeRLStage) else []):
        if d not in recipe.domains:
            raise RecipeError(f"{at('order', i)}: domain {d!r} is not in the recipe's `domains`")


def _check_teachers(recipe: Recipe, stage: MOPDStage | OffPolicyFTStage, at: Where) -> None:
    """Teachers are keyed by recipe domains; a mopd stage's domains without one are reward-only, and its
    teachers' backends installed; an off-policy stage has a teacher for every domain (its traces' source)."""
    for d in stage.teachers:
        if d not in recipe.domains:
            raise RecipeError(f"{at('teachers', d)}: domain {d!r} is not in the recipe's `domains`")
    if isinstance(stage, MOPDStage):
        _check_reward_only(stage, stage.domains or recipe.domains, at)
        if why := missing_extra(stage.teacher_backends):
            raise RecipeError(f"{at('teacher_backends')}: {why}")
    for d in stage.domains or recipe.domains:
        if d not in stage.teachers and isinstance(stage, OffPolicyFTStage):
            raise RecipeError(
                f"{at('teachers')}: domain {d!r} has no teacher "
                f"(add `{d}: <teacher stage>` or drop it from the stage's `domains`)"
            )


def _check_reward_only(stage: MOPDStage, domains: list[str], at: Where) -> None:
    """A mopd stage's domains without a teacher are reward-only (trained by GRPO on their reward inside the
    stage, Nemotron 3 Ultra): that needs groups to compare (group_size >= 2), the sampled-token objective (the
    one whose advantages the GRPO rows join), and at least one teacher (else the stage is an rlvr stage)."""
    reward_only = [d for d in domains if d not in stage.teachers]
    if not reward_only:
        return
    if len(reward_only) == len(domains):
        raise RecipeError(f"{at('teachers')}: none of the stage's domains has a teacher (use `kind: rlvr`)")
    if stage.group_size < 2:
        raise RecipeError(
            f"{at('group_size')}: domain {reward_only[0]!r} has no teacher, so it is trained by GRPO on its "
            f"reward, which compares a prompt's samples: group_size >= 2 (got {stage.group_size})"
        )
    if stage.objective != "sampled":
        raise RecipeError(
            f"{at('objective')}: domain {reward_only[0]!r} has no teacher (reward-only, trained by GRPO); "
            f"reward-only domains need `objective: sampled` (got {stage.objective!r})"
        )


def _check_domain_weights(stage: SamplingSettings, domains: list[str], at: Where) -> None:
    """Weights are given to the stage's own domains (`domains`); that each is above 0 is the schema's rule."""
    for d in stage.domain_weights or {}:
        if d not in domains:
            raise RecipeError(f"{at('domain_weights', d)}: {d!r} is not one of the stage's domains "
                              f"({', '.join(domains)})")


def check_teacher_schedules(recipe: Recipe, where: Where) -> None:
    """Every scheduled snapshot must be one each teacher keeps: a recipe stage with keep_every dividing it."""
    for name, stage in recipe.stages.items():
        if not (isinstance(stage, MOPDStage) and stage.teacher_schedule):
            continue
        for i, phase in enumerate(stage.teacher_schedule):
            if phase.snapshot != "final":
                _check_snapshot(recipe, stage, phase.snapshot, where("stages", name, "teacher_schedule", i, "snapshot"))


def _check_snapshot(recipe: Recipe, stage: MOPDStage, snapshot: int, at: str) -> None:
    for domain, teacher in stage.teachers.items():
        t = recipe.stages.get(teacher)
        if t is None:
            raise RecipeError(
                f"{at}: teacher {teacher!r} ({domain}) is not a stage of this recipe, so it keeps no snapshots"
            )
        keep = getattr(t, "keep_every", 0)
        if not keep:
            raise RecipeError(f"{at}: teacher {teacher!r} keeps no snapshots (set `keep_every` on it)")
        if snapshot % keep or snapshot >= t.steps:
            raise RecipeError(
                f"{at}: teacher {teacher!r} keeps snapshots every {keep} steps before step {t.steps}; "
                f"there is no step-{snapshot}"
            )
