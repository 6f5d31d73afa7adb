"""Open a run's experiment trackers from its loaded recipe: the tracker run's config (the recipe, each stage's
identity and lineage) and each stage's place on the global step axis.

Why here and not in `tracking`: these come from the recipe layer (identities, references), which `tracking`,
below it, does not import; the runner calls `run_trackers` once per run.
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..core.errors import StageError
from ..recipe.identity import stage_identities
from ..recipe.load import LoadedRecipe
from ..tracking import Trackers, open_trackers
from ..tracking.base import enabled

__all__ = ["Trackers", "run_trackers", "tracker_config"]


def tracker_config(loaded: LoadedRecipe, identities: dict[str, str]) -> dict:
    """The recipe as validated, each stage's identity, and its lineage (kind, start, teachers, parents)."""
    recipe = loaded.recipe
    lineage = {}
    for name in loaded.order:
        stage = recipe.stages[name]
        lineage[name] = {
            "kind": stage.kind,
            "init": loaded.facts[name].init,
            "teachers": dict(getattr(stage, "teachers", None) or {}),
            "domains": list(loaded.facts[name].domains),
            "parents": {ref: identities.get(ref, ref) for _, ref in loaded.facts[name].refs},
            "identity": identities[name],
        }
    return {"recipe": recipe.model_dump(mode="json"), "identities": identities, "lineage": lineage,
            "mopd_version": __version__}


def run_trackers(loaded: LoadedRecipe, out: Path) -> Trackers:
    """The trackers the recipe's `logging:` turns on, opened for run directory `out` (a fan-out that does
    nothing when none is on). A tracker whose library is not installed is one StageError line."""
    recipe = loaded.recipe
    if not enabled(recipe.logging):
        return open_trackers(recipe.logging, Path(out), project=recipe.name, config={}, spans={})
    ids = stage_identities(loaded)
    spans = {n: (ids[n], int(getattr(recipe.stages[n], "steps", 0) or 0)) for n in loaded.order}
    try:
        return open_trackers(recipe.logging, Path(out), project=recipe.name, config=tracker_config(loaded, ids),
                             spans=spans)
    except ValueError as e:
        raise StageError(f"logging: {e}") from None

