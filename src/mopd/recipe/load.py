"""Load a YAML recipe and reject every mistake before any compute, in one line naming file, line and key.

Loading is also where process-wide state is read, once: plugins register their domains, and every domain the
recipe names is looked up and kept on the `LoadedRecipe`; stages get their domains from there, never from the
registry.

`load_recipe` is the order of the checks, each in the module of its concern; the first mistake in that order is
the one line a user sees. A stage's rules over its own settings (a linear temperature schedule needs its end, a
topk objective asks an HTTP teacher for no more logprobs than it returns) are validators on its model in
`core.schema`, so they answer with the schema, at the offending key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import RecipeError
from ..core.schema import Recipe
from ..envs import DomainLike
from .agent_checks import check_agents, demonstration_warnings
from .domains import load_plugins, recipe_domains
from .memory_check import check_model_memory
from .reduced_scale import apply_scale
from .refs import StageFacts, stage_facts, topo_order
from .report_checks import check_compare, check_report_student
from .resources import check_resources
from .reward_checks import check_rewards
from .stage_checks import check_stage, check_stage_names, check_teacher_schedules
from .tokenizer_checks import check_bpe_room, check_tokenizer_agreement
from .yaml_file import key_lines, read_yaml, refuse_duplicate_keys, validate_recipe, where_in_file

__all__ = ["LoadedRecipe", "RecipeError", "load_recipe"]


@dataclass
class LoadedRecipe:
    recipe: Recipe
    path: Path
    order: list[str]  # stages in dependency order
    lines: dict[tuple, int]
    # every recipe domain by name, read once here: registered (built-in, plugin) or declared as data
    domains: dict[str, DomainLike] = field(default_factory=dict)
    # each stage's references, parents, start, domains and seed, derived once (`refs.StageFacts`)
    facts: dict[str, StageFacts] = field(default_factory=dict)
    # legal but worth hearing before compute (`mopd validate`, `mopd run`): one line each
    warnings: list[str] = field(default_factory=list)

    def where(self, *key: Any) -> str:
        return where_in_file(self.path, self.lines, key)


def load_recipe(path: str | Path, *, check_tokenizers: bool = True, check_hub: bool = True) -> LoadedRecipe:
    """Load and check a recipe (see the module docstring). `check_tokenizers=False` skips reading the models'
    tokenizers; `check_hub=False` skips asking whether Hub ids can be loaded here (checking a recipe meant for
    another machine)."""
    path = Path(path)
    node, raw = read_yaml(path)  # the file, its YAML syntax
    lines = key_lines(node)
    refuse_duplicate_keys(path, node)
    recipe = validate_recipe(path, lines, raw)  # the schema: keys, kinds, types, each stage's own rules

    def where(*key: Any) -> str:
        return where_in_file(path, lines, key)

    recipe = apply_scale(recipe, where)  # a reduced-scale run is checked on its scaled numbers
    check_stage_names(recipe, path.parent, where)
    check_bpe_room(recipe, where)
    facts = stage_facts(recipe)  # each stage's references, domains, start and seed, derived once
    load_plugins(recipe, path, where)
    data = check_resources(recipe, path, where)  # data domains (built here), devices, packages
    domains = recipe_domains(recipe, data, where)
    deps = {name: check_stage(recipe, name, facts[name], path.parent, where, check_hub=check_hub)  # refs, domains
            for name in recipe.stages}
    order = topo_order(recipe.stages, deps, where)  # cycles
    check_model_memory(recipe, order, path.parent, where, data, domains)
    check_teacher_schedules(recipe, where)
    check_rewards(recipe, facts, path.parent, domains, order, where)  # reward sources, judges, preference datasets
    check_agents(recipe, facts, domains, where)  # tool-use domains only where episodes are sampled (docs/AGENTS.md)
    check_compare(recipe, where)
    check_report_student(recipe, where)
    loaded = LoadedRecipe(recipe=recipe, path=path, order=order, lines=lines, domains=domains,
                          facts=facts, warnings=demonstration_warnings(recipe, facts, domains, where))
    if check_tokenizers:
        check_tokenizer_agreement(loaded)
    return loaded
