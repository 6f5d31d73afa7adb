"""Load a YAML recipe and reject every mistake before any compute, in one line naming file, line and key.

Loading is also where process-wide state is read, once: plugins register their domains, and every domain the
recipe names is looked up and kept on the `LoadedRecipe`; stages get their domains from there, never from the
registry.

Checks, in order: YAML syntax; schema (unknown keys, unknown stage kinds, types); plugins; domains; references
to stages that do not exist; cycles; off-policy domains without a teacher (a MOPD stage's are reward-only:
GRPO inside the stage, whose settings are checked); a MOPD stage's `teacher_backends` (its objective, the
extras they need); cascade orders, teacher
schedules and the `compare:` block; teachers (and merged models) whose tokenizer differs from the student's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..core.errors import RecipeError
from ..core.schema import (
    KINDS,
    NAME_PATTERN,
    CascadeRLStage,
    EvalStage,
    MOPDStage,
    OffPolicyFTStage,
    Recipe,
    SamplingSettings,
)
from ..core.schema.teachers import backend_problem, missing_extra, served_over_http
from ..envs import Domain, DomainLike, domain_problem, get_domain, list_domains, load_plugin
from ..models.integrity import sealed_dir_problem
from .agent_checks import check_agents
from .hub import hub_unavailable_reason
from .memory_check import check_model_memory
from .reduced_scale import apply_scale
from .refs import external_or_fail, looks_like_path, stage_domains, stage_refs, topo_order
from .resources import alphabet_gap, check_resources
from .reward_checks import check_rewards
from .tokenizer_checks import check_tokenizer_agreement

__all__ = ["LoadedRecipe", "RecipeError", "load_recipe"]


@dataclass
class LoadedRecipe:
    recipe: Recipe
    path: Path
    order: list[str]  # stages in dependency order
    lines: dict[tuple, int]
    # every recipe domain by name, read once here: registered (built-in, plugin) or declared as data
    domains: dict[str, DomainLike] = field(default_factory=dict)

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


def _refuse_duplicate_keys(path: Path, node: yaml.Node | None) -> None:
    """YAML lets a later key silently replace an earlier one; a recipe that says a setting twice is a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for k, v in node.value:
            if k.value in seen:
                raise RecipeError(
                    f"{path}:{k.start_mark.line + 1}: key {k.value!r} appears twice in one mapping "
                    f"(first on line {seen[k.value]})"
                )
            seen[k.value] = k.start_mark.line + 1
            _refuse_duplicate_keys(path, v)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _refuse_duplicate_keys(path, v)


def _where(path: Path, lines: dict[tuple, int], key: tuple) -> str:
    key = _as_yaml_keys(lines, tuple(key))
    line = None
    for n in range(len(key), 0, -1):
        if key[:n] in lines:
            line = lines[key[:n]]
            break
    dotted = ".".join(str(k) for k in key) or "(top level)"
    return f"{path}:{line}: {dotted}" if line else f"{path}: {dotted}"


def _as_yaml_keys(lines: dict[tuple, int], key: tuple) -> tuple:
    """`key` with each number that is a mapping key in the file (`7:` parsed to 7) spelled as the file has it:
    the line map holds mapping keys as text and list positions as numbers."""
    out: tuple = ()
    for k in key:
        out += (k if (*out, k) in lines or not isinstance(k, int) else str(k),)
    return out


def _schema_error(path: Path, lines: dict[tuple, int], err: ValidationError) -> RecipeError:
    e = err.errors()[0]
    loc = list(e["loc"])
    # pydantic inserts the union tag (the stage kind) into the location: stages.<name>.<kind>.<field>
    if len(loc) >= 3 and loc[0] == "stages" and loc[2] in KINDS:
        del loc[2]
    # ... and the entry tag of a domain (a name or a data mapping): domains.<i>.data.<field>
    if len(loc) >= 3 and loc[0] == "domains" and loc[2] in ("name", "data"):
        del loc[2]
    # ... and the backend of a teacher: stages.<name>.teacher_backends.<teacher>.<backend>.<field>
    if len(loc) >= 5 and loc[2] == "teacher_backends" and loc[4] in ("actor", "http"):
        del loc[4]
    msg = e["msg"]
    if loc and loc[-1] == "[key]":  # a mapping key YAML read as a number or a bool (`7:`, `yes:`)
        loc.pop()
        msg = f"a name must be a string: quote it ('{loc[-1]}')"
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "union_tag_invalid" and len(loc) == 2:  # a stage's (other unions keep pydantic's words)
        loc.append("kind")
        msg = f"unknown stage kind {e['input'].get('kind')!r}; expected one of {', '.join(KINDS)}"
    elif e["type"] == "union_tag_not_found" and len(loc) == 2:
        msg = f"missing `kind`; expected one of {', '.join(KINDS)}"
    return RecipeError(f"{_where(path, lines, tuple(loc))}: {msg}")


def _check_sampling(stage: SamplingSettings, domains: list[str], where) -> None:
    """Sampling settings that only make sense together (rlvr and mopd stages; `domains`: the stage's);
    `where(*key)` locates a key."""
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
    for d, w in (stage.domain_weights or {}).items():
        if d not in domains:
            raise RecipeError(f"{where('domain_weights', d)}: {d!r} is not one of the stage's domains "
                              f"({', '.join(domains)})")
        if not w > 0:
            raise RecipeError(f"{where('domain_weights', d)}: a weight must be above 0 (got {w})")
    if isinstance(stage, MOPDStage) and stage.surprise_alpha > 0 and stage.objective != "sampled":
        raise RecipeError(
            f"{where('surprise_alpha')}: surprise reweighting scales sampled-token advantages; it needs "
            f"`objective: sampled` (got {stage.objective!r})"
        )


def _check_reward_only(stage: MOPDStage, domains: list[str], where) -> None:
    """A mopd stage's domains without a teacher are reward-only (trained by GRPO on their reward inside the
    stage, Nemotron 3 Ultra): that needs groups to compare (group_size >= 2), the sampled-token objective (the
    one whose advantages the GRPO rows join), and at least one teacher (else the stage is an rlvr stage)."""
    reward_only = [d for d in domains if d not in stage.teachers]
    if not reward_only:
        return
    if len(reward_only) == len(domains):
        raise RecipeError(f"{where('teachers')}: none of the stage's domains has a teacher (use `kind: rlvr`)")
    if stage.group_size < 2:
        raise RecipeError(
            f"{where('group_size')}: domain {reward_only[0]!r} has no teacher, so it is trained by GRPO on its "
            f"reward, which compares a prompt's samples: group_size >= 2 (got {stage.group_size})"
        )
    if stage.objective != "sampled":
        raise RecipeError(
            f"{where('objective')}: domain {reward_only[0]!r} has no teacher (reward-only, trained by GRPO); "
            f"reward-only domains need `objective: sampled` (got {stage.objective!r})"
        )


def load_recipe(path: str | Path, *, check_tokenizers: bool = True, check_hub: bool = True) -> LoadedRecipe:
    """Load and check a recipe (see the module docstring). `check_tokenizers=False` skips reading the models'
    tokenizers; `check_hub=False` skips asking whether Hub ids can be loaded here (checking a recipe meant for
    another machine)."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    if not path.is_file():
        raise RecipeError(f"{path}: not a file (a recipe is a YAML file)")
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as e:
        raise RecipeError(f"{path}: cannot read it as a YAML text file ({e.__class__.__name__})") from None
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    lines = _key_lines(node) if node is not None else {}
    _refuse_duplicate_keys(path, node)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with at least `name`, `domains` and `stages`")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise _schema_error(path, lines, err) from None

    def where(*key: Any) -> str:
        return _where(path, lines, key)

    recipe = apply_scale(recipe, where)  # a reduced-scale run is checked on its scaled numbers

    for name in recipe.stages:  # a stage name becomes a directory of the run
        if not re.fullmatch(NAME_PATTERN, name):
            raise RecipeError(
                f"{where('stages', name)}: stage name {name!r} is not allowed: use letters, digits, '_', '-' and '.', "
                "starting with a letter, digit or '_' (it names the stage's directory in the run)"
            )
    for i, plugin in enumerate(recipe.plugins):
        p = Path(plugin) if Path(plugin).is_absolute() else path.parent / plugin
        if not p.exists():
            raise RecipeError(f"{where('plugins', i)}: plugin file {p} does not exist")
        try:
            load_plugin(p)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # a broken plugin (even one that calls sys.exit) is a recipe error, one line
            raise RecipeError(
                f"{where('plugins', i)}: plugin {p} failed to load: {e.__class__.__name__}: {e}"
            ) from None
    data = check_resources(recipe, path, where)  # data domains (built here), devices, packages
    domains: dict[str, DomainLike] = {}
    for i, d in enumerate(recipe.domains):
        try:
            domains[d] = data[d] if d in data else get_domain(d)
        except KeyError:
            raise RecipeError(
                f"{where('domains', i)}: unknown domain {d!r}; known: {', '.join(list_domains())}"
            ) from None
        if isinstance(domains[d], Domain) and (why := domain_problem(domains[d], recipe.eval.size, recipe.eval.seed)):
            raise RecipeError(f"{where('domains', i)}: {why}")
        source = getattr(recipe.data_domains.get(i), "source", None)  # a data domain is named by its data
        if why := alphabet_gap(recipe, domains[d], repr(source) if source else f"domain {d!r}"):
            raise RecipeError(f"{where('domains', i)}: {why}")

    deps: dict[str, list[str]] = {}
    for name, stage in recipe.stages.items():
        deps[name] = []
        for key, ref in stage_refs(stage):
            if ref in recipe.stages:
                if ref == name:
                    raise RecipeError(f"{where('stages', name, *key)}: stage {name!r} refers to itself")
                if isinstance(recipe.stages[ref], EvalStage):
                    raise RecipeError(
                        f"{where('stages', name, *key)}: {ref!r} is an eval stage: it writes scores, not a model"
                    )
                deps[name].append(ref)
            elif (external := external_or_fail(ref, path.parent, where("stages", name, *key))) is None:
                hint = "" if looks_like_path(ref) else f"; stages are: {', '.join(recipe.stages)}"
                raise RecipeError(
                    f"{where('stages', name, *key)}: {ref!r} is neither a stage of this recipe nor a model "
                    f"directory{hint}"
                )
            elif Path(external).is_dir() and not (Path(external) / "config.json").is_file():
                raise RecipeError(
                    f"{where('stages', name, *key)}: {ref!r} is a directory without a Hugging Face model "
                    "(no config.json)"
                )
            elif Path(external).is_dir() and (problem := sealed_dir_problem(Path(external))):
                raise RecipeError(f"{where('stages', name, *key)}: {ref!r}: {problem}")
            elif (check_hub and not Path(external).is_dir() and not served_over_http(stage, key)
                  and (why := hub_unavailable_reason(external))):
                raise RecipeError(f"{where('stages', name, *key)}: Hub model {ref!r}: {why}; download it first "
                                  "or name a local directory")
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
            if isinstance(stage, MOPDStage):
                _check_reward_only(stage, stage.domains or recipe.domains, lambda *key, name=name: where(
                    "stages", name, *key))
            if isinstance(stage, MOPDStage) and (why := backend_problem(stage) or missing_extra(stage.teacher_backends)):
                raise RecipeError(f"{where('stages', name, 'teacher_backends')}: {why}")
            for d in stage.domains or recipe.domains:
                if d not in stage.teachers and isinstance(stage, OffPolicyFTStage):
                    raise RecipeError(
                        f"{where('stages', name, 'teachers')}: domain {d!r} has no teacher "
                        f"(add `{d}: <teacher stage>` or drop it from the stage's `domains`)"
                    )
        if isinstance(stage, SamplingSettings):
            _check_sampling(stage, stage_domains(stage, recipe), lambda *key, name=name: where("stages", name, *key))
    order = topo_order(recipe.stages, deps, where)
    check_model_memory(recipe, order, path.parent, where)
    for name, stage in recipe.stages.items():
        if isinstance(stage, MOPDStage) and stage.teacher_schedule:
            _check_teacher_schedule(recipe, name, stage, where)
    check_rewards(recipe, path.parent, domains, order, where)  # reward sources, judges, preference datasets
    check_agents(recipe, domains, where)  # tool-use domains only where episodes are sampled (docs/AGENTS.md)
    if recipe.compare is not None:
        _check_compare(recipe, where)
    if recipe.report.student is not None and not isinstance(
        recipe.stages.get(recipe.report.student), MOPDStage
    ):
        raise RecipeError(f"{where('report', 'student')}: {recipe.report.student!r} is not a mopd stage")
    loaded = LoadedRecipe(recipe=recipe, path=path, order=order, lines=lines, domains=domains)
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


