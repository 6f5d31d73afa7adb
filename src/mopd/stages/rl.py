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
from .rewards import stage_reward
from .rollout_workers import rollout_pool
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
    # a mopd stage's domains without a teacher: trained by GRPO on their reward in the same step (Nemotron 3 Ultra)
    reward_only = frozenset(d.name for d in ctx.domains if distill and d.name not in ctx.teacher_of_domain)
    reward = stage_reward(ctx)  # `reward:` a reward model or judge (None: the domains' verifiers)

    dp = ctx.data_parallel  # a rank of a data-parallel learner (`learner:`), else None
    workers = rollout_pool(ctx, rollouts)  # `rollout:` rollout workers (or their in-process twin), else None

    def draw(step):
        problems = source_at(step).draw(step_rng(ctx.seed, step), s.batch_size, step=step)
        return problems, temperature_at(step, s.steps, s.temperature, s.temperature_end, s.temperature_schedule)

    def loss_fn(model, step):
        problems, temperature = draw(step)
        sampling = model if dp is None else dp.sampling_model(model)  # FSDP: rank 0's unsharded copy
        if dp is not None and not dp.lead:  # a data-parallel learner: rank 0 samples, every rank trains on it
            batch, metrics = dp.broadcast(None)
        else:
            batch, metrics = rollout(sampling, ctx.tokenizer, problems, domains, s, temperature=temperature,
                                     generator=step_generator(ctx.seed, step),
                                     sampler=rollouts() if workers is None else workers(sampling).sampler(step),
                                     prompt_format=ctx.prompt_format, reward=reward)
            if dp is not None:
                dp.broadcast((batch, metrics))
        if workers is not None and (dp is None or dp.lead):
            metrics.update(workers(sampling).metrics)
            if workers.max_lag and step + 1 < s.steps:  # the next step samples while this one trains
                upcoming, upcoming_temperature = draw(step + 1)
                workers(sampling).prefetch(step + 1, sampling, upcoming, temperature=upcoming_temperature,
                                        generator=step_generator(ctx.seed, step + 1),
                                        prompt_format=ctx.prompt_format)
        cfg = PolicyConfig(sampling=s, distill=distill, teachers=teachers_at(step) if teachers_at else None,
                           reward_only=reward_only)
        loss, loss_metrics = policy_loss(model, batch, cfg, temperature=temperature,
                                         micro_batch_size=s.micro_batch_size, logit_chunk=s.logit_chunk, dp=dp,
                                         by_length=s.micro_batch_by_length)
        return loss, {**metrics, **loss_metrics, "samples/student": len(problems) * s.group_size}

    if workers is not None:
        loss_fn.close = workers.close  # the driver ends the rollout workers with the stage
    return loss_fn


def run_rl(ctx: ResolvedStage) -> Path:
    """rlvr / mix_rl (the stage's domains) and cascade_rl (one domain per phase of the steps)."""
    if isinstance(ctx.settings, CascadeRLStage):
        source_at = cascade_sources(ctx)
    else:
        source = problem_source(ctx)
        source_at = lambda step: source  # noqa: E731
    return train(ctx, starting_model(ctx), policy_step_fn(ctx, source_at))
