"""Load a YAML recipe and reject every mistake before any compute, in one line naming file, line and key.

Checks, in order: YAML syntax; schema (unknown keys, unknown stage kinds, types); plugins; domains; references
to stages that do not exist; cycles; MOPD / off-policy domains without a teacher; cascade orders, teacher
schedules and the `compare:` block; teachers (and merged models) whose tokenizer differs from the student's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .schema import (
    KINDS,
    CascadeRLStage,
    EvalStage,
    MergeStage,
    MOPDStage,
    OffPolicyFTStage,
    PretrainStage,
    Recipe,
    SamplingSettings,
)


class RecipeError(ValueError):
    """A recipe mistake; str() is the one line the CLI prints."""


@dataclass
class LoadedRecipe:
    recipe: Recipe
    path: Path
    order: list[str]  # stages in dependency order
    lines: dict[tuple, int]

    def where(self, *key: Any) -> str:
        return _where(self.path, self.lines, key)


def _key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path (('stages', 'sft', 'lr')) to its 1-based line in the file."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = (*prefix, k.value)
            out[path] = k.start_mark.line + 1
            out.update(_key_lines(v, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            path = (*prefix, i)
            out[path] = v.start_mark.line + 1
            out.update(_key_lines(v, path))
    return out


def _where(path: Path, lines: dict[tuple, int], key: tuple) -> str:
    key = tuple(key)
    line = None
    for n in range(len(key), 0, -1):
        if key[:n] in lines:
            line = lines[key[:n]]
            break
    dotted = ".".join(str(k) for k in key) or "(top level)"
    return f"{path}:{line}: {dotted}" if line else f"{path}: {dotted}"


def _schema_error(path: Path, lines: dict[tuple, int], err: ValidationError) -> RecipeError:
    e = err.errors()[0]
    loc = list(e["loc"])
    # pydantic inserts the union tag (the stage kind) into the location: stages.<name>.<kind>.<field>
    if len(loc) >= 3 and loc[0] == "stages" and loc[2] in KINDS:
        del loc[2]
    # ... and the entry tag of a domain (a name or a data mapping): domains.<i>.data.<field>
    if len(loc) >= 3 and loc[0] == "domains" and loc[2] in ("name", "data"):
        del loc[2]
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "union_tag_invalid":
        msg = f"unknown stage kind {e['input'].get('kind')!r}; expected one of {', '.join(KINDS)}"
    elif e["type"] == "union_tag_not_found":
        msg = f"missing `kind`; expected one of {', '.join(KINDS)}"
    return RecipeError(f"{_where(path, lines, tuple(loc))}: {msg}")


def _refs(stage) -> list[tuple[tuple, str]]:
    """(key path within the stage, referenced name) for every reference a stage makes."""
    refs: list[tuple[tuple, str]] = []
    if getattr(stage, "init", None):
        refs.append((("init",), stage.init))
    if isinstance(stage, MOPDStage | OffPolicyFTStage):
        refs += [(("teachers", d), t) for d, t in stage.teachers.items()]
    if isinstance(stage, MergeStage):
        refs.append((("base",), stage.base))
        refs += [(("models", i), m) for i, m in enumerate(stage.models)]
    if isinstance(stage, EvalStage):
        refs += [(("models", i), m) for i, m in enumerate(stage.models)]
    return refs


def _check_sampling(stage: SamplingSettings, where) -> None:
    """Sampling settings that only make sense together (rlvr and mopd stages); `where(*key)` locates a key."""
    if stage.temperature_schedule == "linear" and stage.temperature_end is None:
        raise RecipeError(f"{where('temperature_schedule')}: a linear schedule needs `temperature_end`")
    if stage.temperature_schedule == "constant" and stage.temperature_end is not None:
        raise RecipeError(
            f"{where('temperature_end')}: only used by `temperature_schedule: linear` (the schedule is constant)"
        )
    if stage.filter_solved and stage.group_size < 2:
        raise RecipeError(
            f"{where('filter_solved')}: a group pass rate needs group_size >= 2 (got {stage.group_size})"
        )
    if isinstance(stage, MOPDStage) and stage.surprise_alpha > 0 and stage.objective != "sampled":
        raise RecipeError(
            f"{where('surprise_alpha')}: surprise reweighting scales sampled-token advantages; it needs "
            f"`objective: sampled` (got {stage.objective!r})"
        )


def init_ref(stage) -> str | None:
    """The checkpoint a stage's weights start from: `init`, or a merge's `base`."""
    return stage.base if isinstance(stage, MergeStage) else getattr(stage, "init", None)


def _looks_like_path(ref: str) -> bool:
    return "/" in ref or ref.startswith(".") or Path(ref).exists()


def _resolve_external(ref: str, base: Path) -> str | None:
    """An external reference: a local HF directory (relative to the recipe) or a hub id (contains '/')."""
    p = Path(ref).expanduser()
    p = p if p.is_absolute() else (base / p)
    if p.is_dir():
        return str(p.resolve())
    return ref if "/" in ref and not ref.startswith((".", "/")) else None


def topo_order(stages: dict[str, Any], deps: dict[str, list[str]], where) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join([*chain[chain.index(name) :], name])
            raise RecipeError(f"{where('stages', name)}: cycle in stage references: {cycle}")
        state[name] = 1
        for d in deps[name]:
            visit(d, [*chain, name])
        state[name] = 2
        order.append(name)

    for name in stages:
        visit(name, [])
    return order


def load_recipe(path: str | Path, *, check_tokenizers: bool = True) -> LoadedRecipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    text = path.read_text()
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    lines = _key_lines(node) if node is not None else {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with at least `name`, `domains` and `stages`")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise _schema_error(path, lines, err) from None

    def where(*key: Any) -> str:
        return _where(path, lines, key)

    from ..envs import get_domain, list_domains, load_plugin

    for i, plugin in enumerate(recipe.plugins):
        p = Path(plugin) if Path(plugin).is_absolute() else path.parent / plugin
        if not p.exists():
            raise RecipeError(f"{where('plugins', i)}: plugin file {p} does not exist")
        try:
            load_plugin(p)
        except Exception as e:  # a broken plugin is a recipe error, reported in one line
            raise RecipeError(f"{where('plugins', i)}: plugin {p} failed to load: {e}") from None
    from .resources import check_resources

    check_resources(recipe, path, where)  # data domains (built and registered here), devices, packages
    for i, d in enumerate(recipe.domains):
        try:
            get_domain(d)
        except KeyError:
            raise RecipeError(
                f"{where('domains', i)}: unknown domain {d!r}; known: {', '.join(list_domains())}"
            ) from None

    deps: dict[str, list[str]] = {}
    for name, stage in recipe.stages.items():
        deps[name] = []
        for key, ref in _refs(stage):
            if ref in recipe.stages:
                if ref == name:
                    raise RecipeError(f"{where('stages', name, *key)}: stage {name!r} refers to itself")
                deps[name].append(ref)
            elif _resolve_external(ref, path.parent) is None:
                hint = "" if _looks_like_path(ref) else f"; stages are: {', '.join(recipe.stages)}"
                raise RecipeError(
                    f"{where('stages', name, *key)}: {ref!r} is neither a stage of this recipe nor a model "
                    f"directory{hint}"
                )
        for i, d in enumerate(getattr(stage, "domains", None) or []):
            if d not in recipe.domains:
                raise RecipeError(
                    f"{where('stages', name, 'domains', i)}: domain {d!r} is not in the recipe's `domains`"
                )
        for i, d in enumerate(stage.order if isinstance(stage, CascadeRLStage) else []):
            if d not in recipe.domains:
                raise RecipeError(
                    f"{where('stages', name, 'order', i)}: domain {d!r} is not in the recipe's `domains`"
                )
        if isinstance(stage, MOPDStage | OffPolicyFTStage):
            for d in stage.teachers:
                if d not in recipe.domains:
                    raise RecipeError(
                        f"{where('stages', name, 'teachers', d)}: domain {d!r} is not in the recipe's `domains`"
                    )
            for d in stage.domains or recipe.domains:
                if d not in stage.teachers:
                    raise RecipeError(
                        f"{where('stages', name, 'teachers')}: domain {d!r} has no teacher "
                        f"(add `{d}: <teacher stage>` or drop it from the stage's `domains`)"
                    )
        if isinstance(stage, SamplingSettings):
            _check_sampling(stage, lambda *key, name=name: where("stages", name, *key))
    order = topo_order(recipe.stages, deps, where)
    for name, stage in recipe.stages.items():
        if isinstance(stage, MOPDStage) and stage.teacher_schedule:
            _check_teacher_schedule(recipe, name, stage, where)
    if recipe.compare is not None:
        _check_compare(recipe, where)
    if recipe.report.student is not None and not isinstance(
        recipe.stages.get(recipe.report.student), MOPDStage
    ):
        raise RecipeError(f"{where('report', 'student')}: {recipe.report.student!r} is not a mopd stage")
    loaded = LoadedRecipe(recipe=recipe, path=path, order=order, lines=lines)
    if check_tokenizers:
        check_tokenizer_agreement(loaded)
    return loaded


def _check_teacher_schedule(recipe: Recipe, name: str, stage: MOPDStage, where) -> None:
    """Every scheduled snapshot must be one each teacher keeps: a recipe stage with keep_every dividing it."""
    for i, phase in enumerate(stage.teacher_schedule or []):
        if phase.snapshot == "final":
            continue
        at = where("stages", name, "teacher_schedule", i, "snapshot")
        for domain, teacher in stage.teachers.items():
            t = recipe.stages.get(teacher)
            if t is None:
                raise RecipeError(
                    f"{at}: teacher {teacher!r} ({domain}) is not a stage of this recipe, so it keeps no snapshots"
                )
            keep = getattr(t, "keep_every", 0)
            if not keep:
                raise RecipeError(f"{at}: teacher {teacher!r} keeps no snapshots (set `keep_every` on it)")
            if phase.snapshot % keep or phase.snapshot >= t.steps:
                raise RecipeError(
                    f"{at}: teacher {teacher!r} keeps snapshots every {keep} steps before step {t.steps}; "
                    f"there is no step-{phase.snapshot}"
                )


def _check_compare(recipe: Recipe, where) -> None:
    """The `compare:` block names training stages of this recipe, and a teacher for every domain."""
    cmp = recipe.compare
    assert cmp is not None
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


def stage_roots(loaded: LoadedRecipe) -> dict[str, str]:
    """For each stage, the model its weights descend from: 'scratch' or an external directory / hub id."""
    roots: dict[str, str] = {}
    stages = loaded.recipe.stages
    for name in loaded.order:
        s = stages[name]
        if isinstance(s, EvalStage):
            continue
        if isinstance(s, PretrainStage) and s.model is not None:
            roots[name] = "scratch"
        elif init_ref(s) in stages:
            roots[name] = roots[init_ref(s)]
        else:
            roots[name] = _resolve_external(init_ref(s), loaded.path.parent) or init_ref(s)
    return roots


def tokenizer_fingerprints(loaded: LoadedRecipe) -> dict[str, str | None]:
    """Fingerprint of the tokenizer every model reference in the recipe will carry (cheap: no weights; None for
    a Hub id that is not in the local cache, since validation never downloads)."""
    from ..models.tokenizer import tokenizer_fingerprint
    from .build import recipe_tokenizer
    from .resources import offline_fingerprint

    cache: dict[str, str | None] = {}

    def of_root(root: str) -> str | None:
        if root not in cache:
            cache[root] = (
                tokenizer_fingerprint(recipe_tokenizer(loaded.recipe)) if root == "scratch" else offline_fingerprint(root)
            )
        return cache[root]

    roots = stage_roots(loaded)
    return {name: of_root(root) for name, root in roots.items()}


def check_tokenizer_agreement(loaded: LoadedRecipe) -> None:
    """A teacher must score the student's token ids, and merged models must share one vocabulary: refuse any
    teacher (merged model) whose tokenizer differs from the student's (the merge base's)."""
    recipe = loaded.recipe
    if not any(isinstance(s, MOPDStage | MergeStage) for s in recipe.stages.values()):
        return
    fps = tokenizer_fingerprints(loaded)
    from .resources import offline_fingerprint

    for name, stage in recipe.stages.items():
        if not isinstance(stage, MOPDStage | MergeStage):
            continue
        student_fp = fps[name]
        key = "teachers" if isinstance(stage, MOPDStage) else "models"
        pairs = stage.teachers.items() if isinstance(stage, MOPDStage) else enumerate(stage.models)
        for domain, teacher in pairs:
            if teacher in recipe.stages:
                fp = fps[teacher]
            else:
                ref = _resolve_external(teacher, loaded.path.parent) or teacher
                try:
                    fp = offline_fingerprint(ref)
                except Exception as e:
                    raise RecipeError(
                        f"{loaded.where('stages', name, key, domain)}: cannot load the tokenizer of "
                        f"{teacher!r}: {e}"
                    ) from None
            if fp is None or student_fp is None:
                continue  # a Hub id not cached here: validation never downloads; checked when the stage starts
            if fp != student_fp and isinstance(stage, MergeStage):
                raise RecipeError(
                    f"{loaded.where('stages', name, key, domain)}: {teacher!r} uses a different tokenizer from the "
                    f"base {stage.base!r}; merging parameters needs the same vocabulary"
                )
            if fp != student_fp:
                raise RecipeError(
                    f"{loaded.where('stages', name, key, domain)}: teacher {teacher!r} uses a different "
                    f"tokenizer from the student {stage.init!r}; on-policy distillation needs the same vocabulary"
                )
