"""The `rejection_sampling` stage: best-of-n answers of a frozen sampler, kept when the stage's reward (the
verifier, a reward model or a judge) passes them,
then the SFT step on the kept (prompt, answer) pairs (Llama 2's rejection-sampling rounds, DeepSeek R1's
rejection-sampling SFT). A round is a stage; the next round names it as its `sampler`.

The answers of step k come from (seed, k), so a resumed stage trains on exactly the answers of an uninterrupted
one. The SFT step is offpolicy_ft's (`baselines.trace_sft_loss`); only where the traces come from differs.
"""

from __future__ import annotations

from pathlib import Path

from ..core.schema import RejectionSamplingStage
from ..learner.rollout import best_of_n
from .baselines import trace_sampler, trace_sft_loss
from .driver import LossFn, train
from .loading import load_placed
from .problems import problem_source, step_generator, step_rng
from .resolved import ResolvedStage
from .rewards import stage_reward
from .start import starting_model


def run_rejection_sampling(ctx: ResolvedStage) -> Path:
    return train(ctx, starting_model(ctx), rejection_loss_fn(ctx))


def rejection_loss_fn(ctx: ResolvedStage) -> LossFn:
    s: RejectionSamplingStage = ctx.settings
    path = ctx.model_refs[s.sampler or s.init]
    sampler = load_placed(ctx, path).eval().requires_grad_(False)  # frozen: it samples, it never trains
    tokenizer, prompt_format = trace_sampler(ctx, path)  # the student's rendering; text from another vocabulary
    source = problem_source(ctx)
    domains = ctx.domain_map
    reward_fn = stage_reward(ctx)  # `reward:` a reward model or judge (None: the domains' verifiers)
    thresholds = s.domain_thresholds or {}

    def loss_fn(model, step):
        problems = source.draw(step_rng(ctx.seed, step), s.batch_size)
        best = best_of_n(sampler, tokenizer, problems, domains, n=s.n, max_new_tokens=s.max_new_tokens,
                         temperature=s.temperature, top_p=s.top_p, generator=step_generator(ctx.seed, step),
                         prompt_format=prompt_format, reward=reward_fn)
        kept = [answer for answer, reward in best if reward >= thresholds.get(answer.domain, s.threshold)]
        metrics = {
            "rejection/kept_frac": len(kept) / len(problems),
            "rejection/best_reward": sum(r for _, r in best) / len(best),
            "samples/student": 0,
            "samples/teacher": len(problems) * s.n,
        }
        return trace_sft_loss(ctx, model, kept, metrics)

    return loss_fn
