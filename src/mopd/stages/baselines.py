"""The comparison baselines of the MOPD paper (arXiv 2606.30406, Table 1) as loss functions for the shared driver.

    mix_rl:       the rlvr step on the union of the domains' prompts (no code here: `rl.py` treats it as rlvr)
    cascade_rl:   the rlvr step whose prompts come from one domain at a time, chosen by the step's phase
    offpolicy_ft: each domain's teacher samples its own prompts; the student takes the SFT step on those traces
                  (`trace_sft_loss`, shared with rejection_sampling). A teacher renders each prompt as the student
                  trains and is evaluated on it (`trace_sampler`: the stage's chat template, when it has one)

Everything random is derived from (seed, step), as in every stage, so a resumed stage continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..core.schema import CascadeRLStage, OffPolicyFTStage, fixed_logit_chunk, fixed_micro_batch
from ..envs import DomainLike, Problem
from ..learner.rollout import best_of_n
from ..learner.supervised import supervised_loss
from ..models.checkpoint import load_tokenizer
from ..models.prompting import PromptFormat, with_pad_token
from ..models.tokenizer import tokenizer_fingerprint
from .driver import LossFn, train
from .loading import load_placed
from .problems import ProblemSource, problem_source, step_generator, step_rng
from .resolved import ResolvedStage
from .start import starting_model


def cascade_spans(s: CascadeRLStage) -> list[tuple[str, int]]:
    """[(domain, end step)] in training order: `steps_per_domain`, or `steps` split evenly with the remainder
    going to the earlier domains (so 10 steps over 3 domains is 4, 3, 3)."""
    if s.steps_per_domain is not None:
        counts = [s.steps_per_domain[d] for d in s.order]
    else:
        q, r = divmod(s.steps, len(s.order))
        counts = [q + (i < r) for i in range(len(s.order))]
    spans, end = [], 0
    for d, n in zip(s.order, counts, strict=True):
        end += n
        spans.append((d, end))
    return spans


def cascade_domain(spans: list[tuple[str, int]], step: int) -> str:
    """The domain of 0-based `step`: the first span that ends after it."""
    return next(d for d, end in spans if step < end)


def cascade_sources(ctx: ResolvedStage) -> Callable[[int], ProblemSource]:
    """Step -> the problem source of that step's domain (one source per domain, built once)."""
    spans = cascade_spans(ctx.settings)
    domains = ctx.domain_map
    sources = {d: problem_source(ctx, [domains[d]]) for d, _ in spans}
    return lambda step: sources[cascade_domain(spans, step)]


def trace_sampler(ctx: ResolvedStage, path: str) -> tuple[object, PromptFormat]:
    """The tokenizer and prompt rendering the frozen model at `path` samples traces with.

    Its vocabulary the student's: the student's tokenizer and the stage's `prompt_format`, so each trace answers
    exactly the prompt ids the SFT step trains on (and the held-out evaluation scores). Another vocabulary: its own
    tokenizer under the recipe's `chat_template` (its own template; the traces are text to the student).
    Why: rendering the raw prompt for a chat model answers a prompt the student is never trained or evaluated on.
    """
    own = with_pad_token(load_tokenizer(path))
    if tokenizer_fingerprint(own) == tokenizer_fingerprint(ctx.tokenizer):
        return ctx.tokenizer, ctx.prompt_format
    return own, ctx.rendering.format_for(own)


def run_offpolicy(ctx: ResolvedStage) -> Path:
    return train(ctx, starting_model(ctx), offpolicy_loss_fn(ctx))


def offpolicy_loss_fn(ctx: ResolvedStage) -> LossFn:
    """Trace distillation: SFT on completions the routed teacher samples for the step's prompts."""
    s: OffPolicyFTStage = ctx.settings
    source = problem_source(ctx)
    domains = ctx.domain_map
    teachers = {}
    for name in sorted(ctx.teachers):
        ref = ctx.teachers[name].checkpoint
        # frozen: on the stage's device in its compute dtype, like MOPD teachers (not float32 on the host)
        model = load_placed(ctx, ref)
        model.eval().requires_grad_(False)
        teachers[name] = (model, *trace_sampler(ctx, ref))

    def loss_fn(model, step):
        problems = source.draw(step_rng(ctx.seed, step), s.batch_size)
        traces, metrics = teacher_traces(problems, s, teachers, step_generator(ctx.seed, step), domains)
        metrics.update({"samples/student": 0, "samples/teacher": len(problems)})
        return trace_sft_loss(ctx, model, traces, metrics)

    return loss_fn


def trace_sft_loss(
    ctx: ResolvedStage, model: torch.nn.Module, traces: list[Problem], metrics: dict[str, float]
) -> tuple[torch.Tensor, dict[str, float]]:
    """The SFT step (answer tokens only) on sampled traces kept by a verifier: offpolicy_ft's teacher traces and
    rejection_sampling's best-of-n answers. No trace kept: a zero loss without a graph (no update this step)."""
    s = ctx.settings
    if not traces:
        return torch.zeros(()), {"loss": 0.0, **metrics}
    loss, sft_metrics = supervised_loss(model, ctx.tokenizer, traces, loss_on_prompt=False,
                                        micro_batch_size=fixed_micro_batch(s), prompt_format=ctx.prompt_format,
                                        logit_chunk=fixed_logit_chunk(s))
    return loss, {**sft_metrics, **metrics}


def teacher_traces(
    problems: list[Problem],
    s: OffPolicyFTStage,
    teachers: dict[str, tuple[torch.nn.Module, object, PromptFormat]],
    generator: torch.Generator,
    domains: Mapping[str, DomainLike],
) -> tuple[list[Problem], dict[str, float]]:
    """Each problem's domain teacher samples one completion from the prompt rendered by its `trace_sampler`
    (tokenizer, prompt format); returns the kept traces as Problems whose `answer` is the teacher's completion
    (what `supervised_loss` trains on), and metrics.

    Teachers sample in sorted-name order from one generator, so the traces of a step are a function of
    (seed, step). With `verified_only`, a trace is kept when its verifier reward is >= `min_reward`. A trace cut
    at `max_new_tokens` is trained on with an EOS appended, like any SFT target.
    """
    by_teacher: dict[str, list[Problem]] = {}
    for p in problems:
        by_teacher.setdefault(s.teachers[p.domain], []).append(p)
    kept: list[Problem] = []
    rewards: list[float] = []
    for name in sorted(by_teacher):
        model, tokenizer, prompt_format = teachers[name]
        for trace, r in best_of_n(model, tokenizer, by_teacher[name], domains, n=1, max_new_tokens=s.max_new_tokens,
                                  temperature=s.temperature, top_p=s.top_p, generator=generator,
                                  prompt_format=prompt_format):
            rewards.append(r)
            if not s.verified_only or r >= s.min_reward:
                kept.append(trace)
    metrics = {
        "offpolicy/teacher_reward": sum(rewards) / max(len(rewards), 1),
        "offpolicy/kept_frac": len(kept) / max(len(problems), 1),
    }
    return kept, metrics
