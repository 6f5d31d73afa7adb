"""The sampling stages' step (rlvr, mix_rl, cascade_rl, and mopd's): draw problems, roll out, take the policy loss.

mix_rl is rlvr on every domain; cascade_rl is rlvr whose problems come from the step's domain (`baselines.py`);
mopd is the same step with a teacher panel (`mopd.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..core.schema import CascadeRLStage, MOPDStage
from ..core.scoring import TeacherScorer
from ..learner.objective_table import PolicyConfig
from ..learner.policy import policy_loss
from ..learner.rollout import rollout
from .baselines import cascade_sources
from .driver import LossFn, train
from .loading import lazy_rollout_sampler
from .problems import ProblemSource, problem_source, step_generator, step_rng
from .resolved import ResolvedStage
from .schedules import temperature_at
from .start import starting_model


def policy_step_fn(
    ctx: ResolvedStage,
    source_at: Callable[[int], ProblemSource],
    teachers_at: Callable[[int], TeacherScorer] | None = None,
) -> LossFn:
    """The loss function of a sampling stage: step -> (problems of `source_at(step)`, rollouts, policy loss
    against the teachers of `teachers_at(step)` when given)."""
    s = ctx.settings
    distill = s if isinstance(s, MOPDStage) else None  # a MOPD stage is its own DistillationSettings
    rollouts = lazy_rollout_sampler(ctx)  # torch sampler, or vLLM (recipe `rollout_backend`), built on first use
    domains = ctx.domain_map

    def loss_fn(model, step):
        problems = source_at(step).draw(step_rng(ctx.seed, step), s.batch_size, step=step)
        temperature = temperature_at(step, s.steps, s.temperature, s.temperature_end, s.temperature_schedule)
        batch, metrics = rollout(model, ctx.tokenizer, problems, domains, s, temperature=temperature,
                                 generator=step_generator(ctx.seed, step), sampler=rollouts(),
                                 prompt_format=ctx.prompt_format)
        cfg = PolicyConfig(sampling=s, distill=distill, teachers=teachers_at(step) if teachers_at else None)
        loss, loss_metrics = policy_loss(model, batch, cfg, temperature=temperature,
                                         micro_batch_size=s.micro_batch_size, logit_chunk=s.logit_chunk)
        return loss, {**metrics, **loss_metrics, "samples/student": len(problems) * s.group_size}

    return loss_fn


def run_rl(ctx: ResolvedStage) -> Path:
    """rlvr / mix_rl (the stage's domains) and cascade_rl (one domain per phase of the steps)."""
    if isinstance(ctx.settings, CascadeRLStage):
        source_at = cascade_sources(ctx)
    else:
        source = problem_source(ctx)
        source_at = lambda step: source  # noqa: E731
    return train(ctx, starting_model(ctx), policy_step_fn(ctx, source_at))
