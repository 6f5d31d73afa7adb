"""Load-time checks of tool-use domains (docs/AGENTS.md): a stage that would play a tool domain's problems as
single turns, or reward its episodes with something other than the episode, is one RecipeError line before
compute.

- rejection_sampling, and dpo / reward_model stages whose pairs are sampled (`pairs_from` policy or models), build
  single-turn answers: their domains may not include a tool domain.
- A stage's `reward:` (a reward model, a judge) scores single-turn completions; a tool domain's reward is its
  episode's, so such a source may not reward one (with `per_domain`, the tool domains keep their verifiers).
- Rollout workers (`rollout:`) sample single turns; tool domains are sampled in the learner.
"""

from __future__ import annotations

from ..core.errors import RecipeError
from ..core.schema import (
    DatasetPairs,
    DPOStage,
    Recipe,
    RejectionSamplingStage,
    RewardModelStage,
    reward_of,
    source_of,
)
from ..envs.tool_domains import is_agentic
from .refs import StageFacts


def check_agents(recipe: Recipe, facts: dict[str, StageFacts], domains: dict, where) -> None:
    """Every check of the module docstring; `domains` are the loaded domains, `where(*key)` locates a key."""
    for name, stage in recipe.stages.items():
        tools = [d for d in facts[name].domains if is_agentic(domains.get(d))]
        if not tools:
            continue
        at = lambda *key, name=name: where("stages", name, *key)  # noqa: E731
        sampled_pairs = isinstance(stage, DPOStage | RewardModelStage) and not isinstance(stage.pairs_from,
                                                                                         DatasetPairs)
        if sampled_pairs or isinstance(stage, RejectionSamplingStage):
            raise RecipeError(f"{at('domains')}: {tools[0]!r} is a tool-use domain, and a {stage.kind} stage samples "
                              "single-turn answers; list its single-turn domains in the stage's `domains`")
        reward = reward_of(stage)
        if judged := [d for d in tools if source_of(reward, d) != "verifier"]:
            raise RecipeError(f"{at('reward')}: {judged[0]!r} is a tool-use domain, rewarded by its episodes; a "
                              "reward model or judge scores single-turn domains only")
        if getattr(stage, "rollout", None) is not None:
            raise RecipeError(f"{at('rollout')}: {tools[0]!r} is a tool-use domain, and rollout workers sample single "
                              "turns; drop `rollout:` (episodes are sampled in the learner)")


def _root(name: str, facts: dict[str, StageFacts]) -> str:
    """The first stage of `name`'s chain of `init`s within the recipe (the stage itself when it has none)."""
    seen = {name}
    while (init := facts[name].init) in facts and init not in seen:
        name = init
        seen.add(name)
    return name


def demonstration_warnings(recipe: Recipe, facts: dict[str, StageFacts], domains: dict, where) -> list[str]:
    """A tool-use domain without a demonstration, trained by a stage whose chain starts from a model built here
    from scratch (it has never seen a tool call, so nothing teaches it to make one): SFT then trains on the bare
    answers, the model never calls a tool and its episodes score 0 (issue 38). A warning, not an error: a
    recipe may mean it (a baseline); a start loaded from elsewhere (a chat model) may already call tools."""
    out = []
    for i, d in enumerate(recipe.domains):
        domain = domains.get(d)
        if not is_agentic(domain) or getattr(domain, "demonstration", None) is not None:
            continue
        roots = sorted({root for n in recipe.stages if d in facts[n].domains
                        if facts[root := _root(n, facts)].init is None})
        if roots:
            out.append(f"{where('domains', i)}: tool-use domain {d!r} has no demonstration, and its stages start "
                       f"from {roots[0]!r}, a model built from scratch that cannot call its tools: SFT trains on the "
                       "bare answers, so the model never calls a tool (0% tool calls) and its episodes score 0; give "
                       "it `demonstration:` (a JSONL file of each task's turns, or a generator; docs/AGENTS.md)")
    return out
