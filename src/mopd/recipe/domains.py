"""The recipe's domains, read once at load: its plugins run (they register domains), then every domain it names
is looked up and checked, and kept on the loaded recipe.

Why once and here: stages get their domains from the loaded recipe, never from the process-wide registry, so a
later plugin or another recipe cannot change what a run trains on; and a domain that cannot supply its held-out
set, or whose characters the tiny model's tokenizer lacks, fails before any compute.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import RecipeError
from ..core.schema import Recipe
from ..envs import Domain, DomainLike, domain_problem, get_domain, list_domains, load_plugin
from .resources import alphabet_gap
from .yaml_file import Where


def load_plugins(recipe: Recipe, recipe_path: Path, where: Where) -> None:
    """Run each plugin file (relative to the recipe); a missing or broken one is one line at its entry."""
    for i, plugin in enumerate(recipe.plugins):
        p = Path(plugin) if Path(plugin).is_absolute() else recipe_path.parent / plugin
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


def recipe_domains(recipe: Recipe, data: dict[str, DomainLike], where: Where) -> dict[str, DomainLike]:
    """Every recipe domain by name: declared as data (`data`, built by `resources.build_data_domains`) or
    registered; each able to supply its held-out set and, for a tiny model, within its tokenizer's alphabet."""
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
    return domains
