"""The sampling stages' step (rlvr, mix_rl, cascade_rl, and mopd's): draw problems, roll out, take the policy loss.

mix_rl is rlvr on every domain; cascade_rl is rlvr whose problems come from the step's domain (`baselines.py`);
mopd is the same step with a teacher panel (`mopd.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.schema import CascadeRLStage, MOPDStage
from ..core.scoring import TeacherScorer
from ..learner.objective_table import PolicyConfig
from ..learner.policy import policy_loss
from ..learner.rollout import rollout
from ..learner.sizing import Sizing
from .baselines import cascade_sources
from .driver import LossFn, train
from .loading import lazy_rollout_sampler
from .problems import ProblemSource, problem_source, step_generator, step_rng
from .resolved import ResolvedStage
from .rewards import stage_reward
from .rollout_workers import LazyPool, rollout_pool
from .samples import log_training_samples, teacher_kl
from .schedules import temperature_at
from .start import starting_model
from .step_sizing import apply_to_panel, stage_sizing
from .step_timing import TimedScorer


def policy_step_fn(
    ctx: ResolvedStage,
    source_at: Callable[[int], ProblemSource],
    teachers_at: Callable[[int], TeacherScorer] | None = None,
    workers: LazyPool | None = None,
) -> LossFn:
    """The loss function of a sampling stage: step -> (problems of `source_at(step)`, rollouts, policy loss
    against the teachers of `teachers_at(step)` when given). `workers`: the stage's rollout workers
    (`policy_workers`), which sample in place of the stage's own sampler."""
    s = ctx.settings
    distill = s if isinstance(s, MOPDStage) else None  # a MOPD stage is its own DistillationSettings
    rollouts = lazy_rollout_sampler(ctx)  # torch sampler, or vLLM (recipe `rollout_backend`), built on first use
    domains = ctx.domain_map
    # a mopd stage's domains without a teacher: trained by GRPO on their reward in the same step (Nemotron 3 Ultra)
    reward_only = frozenset(d.name for d in ctx.domains if distill and d.name not in ctx.teacher_of_domain)
    reward = stage_reward(ctx)  # `reward:` a reward model or judge (None: the domains' verifiers)
    learner = ctx.learner  # one process, or a rank of a data-parallel learner (`learner:`): rank 0 samples
    kl = teacher_kl(ctx, teachers_at) if teachers_at is not None else None  # logged samples' per-turn teacher KL

    def draw(step):
        problems = source_at(step).draw(step_rng(ctx.seed, step), s.batch_size, step=step)
        return problems, temperature_at(step, s.steps, s.temperature, s.temperature_end, s.temperature_schedule)

    def sample(model, step, problems, temperature):
        """Rank 0's part of the step: the rollouts, with rollout workers their metrics, and the next step's
        rollouts started when `max_lag` lets them overlap this step's update."""
        batch, metrics = rollout(model, ctx.tokenizer, problems, domains, s, temperature=temperature,
                                 generator=step_generator(ctx.seed, step),
                                 sampler=rollouts() if workers is None else workers(model).sampler(step),
                                 prompt_format=ctx.prompt_format, reward=reward)
        log_training_samples(ctx, model, batch, step + 1, kl)  # every `log_samples` steps: a few transcripts
        if workers is not None:
            metrics.update(workers(model).metrics)
            if workers.max_lag and step + 1 < s.steps:  # the next step samples while this one trains
                upcoming, upcoming_temperature = draw(step + 1)
                workers(model).prefetch(step + 1, model, upcoming, temperature=upcoming_temperature,
                                        generator=step_generator(ctx.seed, step + 1),
                                        prompt_format=ctx.prompt_format)
        return batch, metrics

    sizing: list[Sizing] = []  # chosen at the first step this process runs

    def loss_fn(model, step):
        t0 = time.perf_counter()
        problems, temperature = draw(step)
        # every rank trains on the batch rank 0 sampled with the unsharded model (FSDP: its copy)
        batch, metrics = learner.from_lead(lambda: sample(learner.whole(model), step, problems, temperature))
        t1 = time.perf_counter()
        panel = teachers_at(step) if teachers_at else None
        if not sizing:
            sizing.append(stage_sizing(ctx, model, batch, panel))
        z = sizing[0]
        apply_to_panel(panel, z)
        timed = TimedScorer(panel) if panel is not None else None
        cfg = PolicyConfig(sampling=s, distill=distill, teachers=timed, reward_only=reward_only)  # type: ignore[arg-type]
        loss, loss_metrics = policy_loss(model, batch, cfg, temperature=temperature,
                                         micro_batch_size=z.micro_batch_size, logit_chunk=z.logit_chunk,
                                         dp=learner.group, by_length=z.by_length, vocab_block=z.vocab_block)
        teachers_s = timed.seconds if timed is not None else 0.0
        times = {"time/sampling_s": t1 - t0, "time/teachers_s": teachers_s,
                 "time/learner_s": time.perf_counter() - t1 - teachers_s}
        return loss, {**metrics, **loss_metrics, **times, "samples/student": len(problems) * s.group_size}

    return loss_fn


@contextmanager
def policy_workers(ctx: ResolvedStage) -> Iterator[LazyPool | None]:
    """The stage's rollout workers (`rollout:`; None without), built at the first step that samples and ended
    with the stage, however it ends (their actors would otherwise outlive it in a reused Ray worker)."""
    pool = rollout_pool(ctx, lazy_rollout_sampler(ctx))
    try:
        yield pool
    finally:
        if pool is not None:
            pool.close()


def run_rl(ctx: ResolvedStage) -> Path:
    """rlvr / mix_rl (the stage's domains) and cascade_rl (one domain per phase of the steps)."""
    if isinstance(ctx.settings, CascadeRLStage):
        source_at = cascade_sources(ctx)
    else:
        source = problem_source(ctx)
        source_at = lambda step: source  # noqa: E731
    with policy_workers(ctx) as workers:
        return train(ctx, starting_model(ctx), policy_step_fn(ctx, source_at, workers=workers))
