"""The `dpo` stage: preference pairs built afresh each step, then `learner.preference.dpo_loss` against a frozen
reference (Tülu 3 and Llama 3's preference stage; OLMo 3's delta pairs).

Pairs come from (seed, step) like every stage's data, so a resumed stage builds exactly the pairs an
uninterrupted one would:
    pairs_from: policy          the policy's `group_size` samples of a prompt (the rollout of the sampling
                                stages), ranked by the domain verifier: best over worst; a tie is no pair.
    pairs_from: {strong, weak}  one sample from each frozen model: strong's answer over weak's; equal text is
                                no pair.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..core.schema import DeltaPairs, DPOStage
from ..envs import Problem
from ..learner.preference import dpo_loss
from ..learner.rollout import best_of_n, rollout
from ..models.checkpoint import load_tokenizer
from ..models.prompting import with_pad_token
from .driver import LossFn, train
from .loading import lazy_rollout_sampler, load_placed
from .problems import problem_source, step_generator, step_rng
from .resolved import ResolvedStage
from .start import starting_model

Pairs = tuple[list[Problem], list[Problem], dict[str, float]]  # (chosen, rejected, metrics)


def run_dpo(ctx: ResolvedStage) -> Path:
    return train(ctx, starting_model(ctx), dpo_loss_fn(ctx))


def frozen(ctx: ResolvedStage, ref: str) -> torch.nn.Module:
    """A model the stage reads but never trains, on its device in its compute dtype."""
    return load_placed(ctx, ctx.model_refs[ref]).eval().requires_grad_(False)


def dpo_loss_fn(ctx: ResolvedStage) -> LossFn:
    s: DPOStage = ctx.settings
    reference = frozen(ctx, s.reference or s.init)
    source = problem_source(ctx)
    build_pairs = delta_pairs_fn(ctx, s.pairs_from) if isinstance(s.pairs_from, DeltaPairs) else policy_pairs_fn(ctx)

    def loss_fn(model, step):
        problems = source.draw(step_rng(ctx.seed, step), s.batch_size)
        chosen, rejected, metrics = build_pairs(model, problems, step_generator(ctx.seed, step))
        metrics["dpo/pairs"] = len(chosen)
        if not chosen:  # every prompt tied: no update this step
            return torch.zeros(()), {"loss": 0.0, **metrics}
        loss, loss_metrics = dpo_loss(model, reference, ctx.tokenizer, chosen, rejected, beta=s.beta, loss=s.loss,
                                      length_normalized=s.length_normalized, micro_batch_size=s.micro_batch_size,
                                      prompt_format=ctx.prompt_format, logit_chunk=s.logit_chunk)
        return loss, {**loss_metrics, **metrics}

    return loss_fn


def policy_pairs_fn(ctx: ResolvedStage) -> Callable[[torch.nn.Module, list[Problem], torch.Generator], Pairs]:
    """Pairs from the policy's own samples: per prompt, the best-rewarded over the worst-rewarded (first of
    equals), skipped when they tie."""
    s: DPOStage = ctx.settings
    rollouts = lazy_rollout_sampler(ctx)
    domains = ctx.domain_map

    def build(model, problems: list[Problem], generator: torch.Generator) -> Pairs:
        batch, metrics = rollout(model, ctx.tokenizer, problems, domains, s, temperature=s.temperature,
                                 generator=generator, sampler=rollouts(), prompt_format=ctx.prompt_format)
        G = s.group_size
        rewards = batch.rewards_B.tolist()
        chosen, rejected = [], []
        for i, p in enumerate(problems):
            group = range(i * G, (i + 1) * G)
            best, worst = max(group, key=rewards.__getitem__), min(group, key=rewards.__getitem__)
            if rewards[best] > rewards[worst]:
                chosen.append(answered(p, batch.completions[best]))
                rejected.append(answered(p, batch.completions[worst]))
        metrics["samples/student"] = len(problems) * G
        return chosen, rejected, metrics

    return build


def delta_pairs_fn(
    ctx: ResolvedStage, pairs: DeltaPairs
) -> Callable[[torch.nn.Module, list[Problem], torch.Generator], Pairs]:
    """OLMo 3's delta pairs: the strong model's sampled answer over the weak model's (each samples with its own
    tokenizer and prompt rendering: answers are text), strong first from the step's generator."""
    s: DPOStage = ctx.settings
    domains = ctx.domain_map
    models = {}
    for role, ref in (("strong", pairs.strong), ("weak", pairs.weak)):
        tokenizer = with_pad_token(load_tokenizer(ctx.model_refs[ref]))
        models[role] = (frozen(ctx, ref), tokenizer, ctx.rendering.format_for(tokenizer))

    def build(model, problems: list[Problem], generator: torch.Generator) -> Pairs:
        answers = {
            role: best_of_n(m, tok, problems, domains, n=1, max_new_tokens=s.max_new_tokens,
                            temperature=s.temperature, top_p=s.top_p, generator=generator, prompt_format=fmt)
            for role, (m, tok, fmt) in models.items()
        }
        kept = [(c, r) for (c, _), (r, _) in zip(answers["strong"], answers["weak"], strict=True)
                if c.answer != r.answer]
        metrics = {
            "dpo/strong_reward": mean([r for _, r in answers["strong"]]),
            "dpo/weak_reward": mean([r for _, r in answers["weak"]]),
            "samples/student": 0,
            "samples/teacher": 2 * len(problems),
        }
        return [c for c, _ in kept], [r for _, r in kept], metrics

    return build


def answered(p: Problem, completion: str) -> Problem:
    """`p` with `completion` as its answer: the row `supervised_batch` builds for a pair's side."""
    return Problem(prompt=p.prompt, answer=completion, domain=p.domain, difficulty=p.difficulty)


def mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)

