"""A recipe as a graph: which names each stage refers to, what an external reference resolves to, and the
order stages run in. Pure functions of the schema, shared by loading, identities, resolution and comparison;
and the loader's check that every reference can be followed (`check_stage_refs`, which looks at the disk and
the Hub), so the graph the other functions walk has no dangling edge."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import RecipeError
from ..core.schema import (
    DeltaPairs,
    DPOStage,
    EvalStage,
    JudgeReward,
    MergeStage,
    MOPDStage,
    OffPolicyFTStage,
    PPOStage,
    PretrainStage,
    Recipe,
    RejectionSamplingStage,
    RewardModelReward,
    RewardModelStage,
    reward_of,
    reward_parts,
)
from ..core.schema.teachers import served_over_http
from ..models.gguf import GGUFError, cached_conversion, is_gguf_ref
from ..models.integrity import sealed_dir_problem
from ..models.weights_check import weights_problem
from .hub import hub_unavailable_reason


def stage_refs(stage) -> list[tuple[tuple, str]]:
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
    if isinstance(stage, DPOStage):
        if stage.reference:
            refs.append((("reference",), stage.reference))
        if isinstance(stage.pairs_from, DeltaPairs):
            refs += [(("pairs_from", "strong"), stage.pairs_from.strong), (("pairs_from", "weak"), stage.pairs_from.weak)]
    if isinstance(stage, RejectionSamplingStage) and stage.sampler:
        refs.append((("sampler",), stage.sampler))
    if isinstance(stage, RewardModelStage) and isinstance(stage.pairs_from, DeltaPairs):
        refs += [(("pairs_from", "strong"), stage.pairs_from.strong), (("pairs_from", "weak"), stage.pairs_from.weak)]
    if isinstance(stage, PPOStage):
        refs += [((key,), getattr(stage, key)) for key in ("reference", "critic") if getattr(stage, key)]
    for key, _, source in reward_parts(reward_of(stage)):
        if isinstance(source, RewardModelReward):
            refs.append((("reward", *key, "reward_model"), source.reward_model))
        if isinstance(source, JudgeReward):
            refs.append((("reward", *key, "judge"), source.judge))
    return refs


@dataclass(frozen=True)
class StageFacts:
    """One stage's place in the recipe's graph, derived once at load from the schema alone (no disk, no Hub):
    everything downstream (identities, the scheduler, resolution, run.json) reads these instead of deriving
    them again."""

    refs: tuple[tuple[tuple, str], ...]  # (key path within the stage, referenced name), as `stage_refs`
    parents: tuple[str, ...]  # the referenced names that are stages of the recipe: what the stage waits for
    init: str | None  # the checkpoint its weights start from (`init_ref`)
    domains: tuple[str, ...]  # what it trains on, or reports (`stage_domains`)
    seed: int  # its own `seed`, else the recipe's


def stage_facts(recipe: Recipe) -> dict[str, StageFacts]:
    facts = {}
    for name, stage in recipe.stages.items():
        refs = tuple(stage_refs(stage))
        facts[name] = StageFacts(refs=refs, parents=tuple(r for _, r in refs if r in recipe.stages),
                                 init=init_ref(stage), domains=tuple(stage_domains(stage, recipe)),
                                 seed=stage_seed(stage, recipe))
    return facts


def init_ref(stage) -> str | None:
    """The checkpoint a stage's weights start from: `init`, or a merge's `base`."""
    return stage.base if isinstance(stage, MergeStage) else getattr(stage, "init", None)


def looks_like_path(ref: str) -> bool:
    return "/" in ref or ref.startswith(".") or Path(ref).exists()


def resolve_external(ref: str, base: Path) -> str | None:
    """An external reference: a local HF directory (relative to the recipe), a hub id (contains '/'), or a GGUF
    file (`gguf:PATH`), converted once into a cached directory (`models.gguf`; GGUFError when it cannot be)."""
    if is_gguf_ref(ref):
        return str(cached_conversion(ref, base))
    p = Path(ref).expanduser()
    p = p if p.is_absolute() else (base / p)
    if p.is_dir():
        return str(p.resolve())
    return ref if "/" in ref and not ref.startswith((".", "/")) else None


def external_or_fail(ref: str, base: Path, at: str) -> str | None:
    """`resolve_external`, with a GGUF that cannot be converted turned into the recipe's one line at `at`."""
    try:
        return resolve_external(ref, base)
    except GGUFError as e:
        raise RecipeError(f"{at}: {e}") from None


def check_stage_refs(recipe: Recipe, name: str, refs: Iterable[tuple[tuple, str]], base: Path, at, *,
                     check_hub: bool) -> list[str]:
    """Each reference of stage `name` is another stage of the recipe that writes a model, or a model this
    machine can load (a directory holding one, intact if sealed; a Hub id it has or can fetch, asked only with
    `check_hub`); returns the stages it depends on. `base`: the recipe's directory; `at(*key)` locates a key of
    the stage."""
    deps: list[str] = []
    stage = recipe.stages[name]
    for key, ref in refs:
        if ref in recipe.stages:
            if ref == name:
                raise RecipeError(f"{at(*key)}: stage {name!r} refers to itself")
            if isinstance(recipe.stages[ref], EvalStage):
                raise RecipeError(f"{at(*key)}: {ref!r} is an eval stage: it writes scores, not a model")
            deps.append(ref)
        elif (external := external_or_fail(ref, base, at(*key))) is None:
            hint = "" if looks_like_path(ref) else f"; stages are: {', '.join(recipe.stages)}"
            raise RecipeError(f"{at(*key)}: {ref!r} is neither a stage of this recipe nor a model directory{hint}")
        elif Path(external).is_dir() and not (Path(external) / "config.json").is_file():
            raise RecipeError(f"{at(*key)}: {ref!r} is a directory without a Hugging Face model (no config.json)")
        elif Path(external).is_dir() and (problem := sealed_dir_problem(Path(external))
                                          or weights_problem(Path(external))):
            raise RecipeError(f"{at(*key)}: {ref!r}: {problem}")
        elif (check_hub and not Path(external).is_dir() and not served_over_http(stage, key)
              and (why := hub_unavailable_reason(external))):
            raise RecipeError(f"{at(*key)}: Hub model {ref!r}: {why}; download it first or name a local directory")
    return deps


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


def stage_roots(stages: dict[str, Any], order: list[str], base: Path) -> dict[str, str]:
    """For each stage, the model its weights descend from: 'scratch' or an external directory / hub id."""
    roots: dict[str, str] = {}
    for name in order:
        s = stages[name]
        if isinstance(s, EvalStage):
            continue
        if isinstance(s, PretrainStage) and s.model is not None:
            roots[name] = "scratch"
        elif init_ref(s) in stages:
            roots[name] = roots[init_ref(s)]
        else:
            roots[name] = resolve_external(init_ref(s), base) or init_ref(s)
    return roots


def stage_seed(stage, recipe) -> int:
    """A stage's seed: its own `seed`, else the recipe's (merge and eval stages have none of their own)."""
    seed = getattr(stage, "seed", None)
    return recipe.seed if seed is None else seed


def stage_domains(stage, recipe) -> list[str]:
    """The domains a stage trains on (or an eval stage reports): its `domains`, else every recipe domain."""
    return list(getattr(stage, "domains", None) or recipe.domains)
