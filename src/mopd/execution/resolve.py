"""Resolve a stage once, just before it runs: everything below reads the `ResolvedStage` this returns.

Why just before: a stage's tokenizer is its starting checkpoint's, which exists only once its parent finished.
Every other entry (device and precisions, seed, domains, prompt rendering, checkpoints of the teachers in every
schedule phase) is a function of the loaded recipe and the run directory.
"""

from __future__ import annotations

from pathlib import Path

from ..core.run_dir import FINAL
from ..core.schema import ExecutorName, MOPDStage, OffPolicyFTStage, reward_of
from ..models.checkpoint import load_tokenizer
from ..models.precision import resolve_placement
from ..models.prompting import Rendering, with_pad_token
from ..recipe.load import LoadedRecipe
from ..recipe.refs import resolve_external
from ..recipe.tokenizer import scratch_tokenizer, tokenizer_settings
from ..stages.lineage import teacher_checkpoint
from ..stages.resolved import ResolvedStage, StageHooks, TeacherRef


def model_refs(loaded: LoadedRecipe, out: Path) -> dict[str, str]:
    """Every name a stage can refer to -> a loadable path / hub id: a stage's final checkpoint under `out`, or
    an external reference resolved against the recipe's folder."""
    refs: dict[str, str] = {}
    for name in loaded.order:
        for _, ref in loaded.facts[name].refs:
            if ref not in loaded.recipe.stages:
                refs[ref] = resolve_external(ref, loaded.path.parent) or ref
    for name, stage in loaded.recipe.stages.items():
        if stage.kind != "eval":
            refs[name] = str(out / name / FINAL)
    return refs


def resolve_stage(
    loaded: LoadedRecipe,
    name: str,
    out: Path,
    identities: dict[str, str],
    *,
    hooks: StageHooks = StageHooks(),
    executor: ExecutorName = "local",
) -> ResolvedStage:
    recipe = loaded.recipe
    stage = recipe.stages[name]
    refs = model_refs(loaded, out)
    facts = loaded.facts[name]
    start = facts.init
    init_path = refs.get(start) if start else None
    if init_path is None:  # a model built from scratch (an eval stage: the recipe's, for its prompt format)
        settings = tokenizer_settings(recipe, name) or recipe.tokenizer
        tokenizer = with_pad_token(scratch_tokenizer(recipe, settings, loaded.domains))
    else:
        tokenizer = with_pad_token(load_tokenizer(init_path))
    rendering = Rendering(recipe.chat_template, dict(recipe.chat_template_kwargs))
    parents = {r: identities.get(r, refs.get(r, r)) for _, r in facts.refs}
    teacher_of_domain = dict(stage.teachers) if isinstance(stage, MOPDStage | OffPolicyFTStage) else {}
    schedule = stage.teacher_schedule if isinstance(stage, MOPDStage) else None
    teachers = {
        t: TeacherRef(
            name=t, identity=parents[t], checkpoint=refs[t],
            phases=tuple(teacher_checkpoint(refs[t], ph.snapshot) for ph in schedule or []),
        )
        for t in sorted(set(teacher_of_domain.values()))
    }
    return ResolvedStage(
        name=name,
        settings=stage,
        identity=identities[name],
        seed=facts.seed,
        stage_dir=out / name,
        placement=resolve_placement(stage, recipe),
        domains=[loaded.domains[d] for d in facts.domains],
        eval_domains=[loaded.domains[d] for d in recipe.domains],
        eval=recipe.eval,
        tokenizer=tokenizer,
        prompt_format=rendering.format_for(tokenizer),
        rendering=rendering,
        init_ref=start,
        init_path=init_path,
        model_refs=refs,
        parents=parents,
        teachers=teachers,
        teacher_of_domain=teacher_of_domain,
        rollout_backend=recipe.rollout_backend,
        vllm_memory_fraction=recipe.vllm_memory_fraction,
        reward=reward_of(stage),
        rollout_workers=getattr(stage, "rollout", None),
        learner_workers=getattr(stage, "learner", None),
        executor=executor,
        hooks=hooks,
    )

