"""What `mopd compare` measures for each method of a recipe's `compare:` block, worked out from the stage DAG.

A method's cost is what it spent beyond the shared start and teachers (which every distillation or merge
method reuses, as in the MOPD paper's table): its *chain* is its stage and the `init` ancestors back to the
start (their student rollouts are the method's student samples); its *extra* stages are any other ancestors
that descend from the start but are not the shared teachers, e.g. round-2 teachers retrained from the
round-1 student (their samples and wall time are charged to the method too).
"""

from __future__ import annotations

from typing import Any

from ..recipe.load import LoadedRecipe


def _ancestors(loaded: LoadedRecipe, name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        for ref in loaded.facts[todo.pop()].parents:
            if ref not in seen:
                seen.add(ref)
                todo.append(ref)
    return seen


def compare_plan(loaded: LoadedRecipe) -> dict[str, Any]:
    """{"start", "teachers", "curves", "reference", "min_teacher_gain", "methods": {label: {"stage", "kind",
    "chain", "extra"}}}
    (plain data, so the report layer reads it without the recipe). `reference`: the method every other is
    compared with (paired differences): the one labelled MOPD, else the first mopd method, else the first."""
    recipe = loaded.recipe
    cmp = recipe.compare
    if cmp is None:
        raise ValueError(f"{loaded.path}: no `compare:` block (see src/mopd/recipes/compare.yaml)")
    stages = recipe.stages
    shared = {cmp.start, *_ancestors(loaded, cmp.start)}
    for t in cmp.teachers.values():
        shared |= {t, *_ancestors(loaded, t)}
    methods = {}
    for label, stage in cmp.methods.items():
        chain, cur = [], stage
        while cur in stages and cur not in shared:
            chain.append(cur)
            cur = loaded.facts[cur].init
        ancestors = _ancestors(loaded, stage)
        after_start = {a for a in ancestors if cmp.start in _ancestors(loaded, a)}
        extra = [s for s in loaded.order if s in after_start - shared - set(chain)]
        methods[label] = {"stage": stage, "kind": stages[stage].kind, "chain": chain, "extra": extra}
    curves = cmp.curves
    if curves is None:
        curves = [label for label, m in methods.items() if m["kind"] in ("mopd", "mix_rl")]
    return {"start": cmp.start, "teachers": dict(cmp.teachers), "curves": list(curves), "methods": methods,
            "reference": reference_method(methods), "min_teacher_gain": recipe.report.min_teacher_gain}


def reference_method(methods: dict[str, dict]) -> str:
    for label in methods:
        if label.lower() == "mopd":
            return label
    return next((label for label, m in methods.items() if m["kind"] == "mopd"), next(iter(methods)))
