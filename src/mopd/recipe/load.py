"""Load a YAML recipe and reject every mistake before any compute, in one line naming file, line and key.

Checks, in order: YAML syntax; schema (unknown keys, unknown stage kinds, types); plugins; domains; references
to stages that do not exist; cycles; MOPD domains without a teacher; teachers whose tokenizer differs from the
student's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .schema import KINDS, EvalStage, MOPDStage, PretrainStage, Recipe


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
    if isinstance(stage, MOPDStage):
        refs += [(("teachers", d), t) for d, t in stage.teachers.items()]
    if isinstance(stage, EvalStage):
        refs += [(("models", i), m) for i, m in enumerate(stage.models)]
    return refs


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
        if isinstance(stage, MOPDStage):
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
    order = topo_order(recipe.stages, deps, where)
    if recipe.report.student is not None and not isinstance(
        recipe.stages.get(recipe.report.student), MOPDStage
    ):
        raise RecipeError(f"{where('report', 'student')}: {recipe.report.student!r} is not a mopd stage")
    loaded = LoadedRecipe(recipe=recipe, path=path, order=order, lines=lines)
    if check_tokenizers:
        check_tokenizer_agreement(loaded)
    return loaded


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
        elif s.init in stages:
            roots[name] = roots[s.init]
        else:
            roots[name] = _resolve_external(s.init, loaded.path.parent) or s.init
    return roots


def tokenizer_fingerprints(loaded: LoadedRecipe) -> dict[str, str]:
    """Fingerprint of the tokenizer every model reference in the recipe will carry (cheap: no weights)."""
    from ..models.checkpoint import load_tokenizer
    from ..models.tokenizer import tokenizer_fingerprint
    from .build import recipe_tokenizer

    cache: dict[str, str] = {}

    def of_root(root: str) -> str:
        if root not in cache:
            tok = recipe_tokenizer(loaded.recipe) if root == "scratch" else load_tokenizer(root)
            cache[root] = tokenizer_fingerprint(tok)
        return cache[root]

    roots = stage_roots(loaded)
    return {name: of_root(root) for name, root in roots.items()}


def check_tokenizer_agreement(loaded: LoadedRecipe) -> None:
    """A teacher must score the student's token ids: refuse any teacher whose tokenizer differs."""
    recipe = loaded.recipe
    if not any(isinstance(s, MOPDStage) for s in recipe.stages.values()):
        return
    fps = tokenizer_fingerprints(loaded)
    from ..models.checkpoint import load_tokenizer
    from ..models.tokenizer import tokenizer_fingerprint

    for name, stage in recipe.stages.items():
        if not isinstance(stage, MOPDStage):
            continue
        student_fp = fps[name]
        for domain, teacher in stage.teachers.items():
            if teacher in recipe.stages:
                fp = fps[teacher]
            else:
                ref = _resolve_external(teacher, loaded.path.parent) or teacher
                try:
                    fp = tokenizer_fingerprint(load_tokenizer(ref))
                except Exception as e:
                    raise RecipeError(
                        f"{loaded.where('stages', name, 'teachers', domain)}: cannot load the tokenizer of "
                        f"{teacher!r}: {e}"
                    ) from None
            if fp != student_fp:
                raise RecipeError(
                    f"{loaded.where('stages', name, 'teachers', domain)}: teacher {teacher!r} uses a different "
                    f"tokenizer from the student {stage.init!r}; on-policy distillation needs the same vocabulary"
                )
