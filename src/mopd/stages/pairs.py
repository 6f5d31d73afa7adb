"""Preference pairs of a step, for the dpo and reward_model stages (`pairs_from`).

Pairs come from (seed, step) like every stage's data, so a resumed stage builds exactly the pairs an
uninterrupted one would:
    pairs_from: policy          `group_size` samples of a prompt by the policy (dpo: the model being trained;
                                reward_model: its frozen `init`), ranked by the stage's `reward` (the domain
                                verifier, a reward model or a judge): best over worst; a tie is no pair.
    pairs_from: {strong, weak}  one sample from each frozen model: strong's answer over weak's; equal text is
                                no pair.
    pairs_from: {dataset}       `batch_size` pairs of the file's training pairs (`data.pairs`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.schema import DatasetPairs, DeltaPairs
from ..data.pairs import PreferencePair, read_pairs, split_pairs
from ..envs import Problem
from ..learner.rollout import best_of_n, rollout
from ..models.checkpoint import load_tokenizer
from ..models.prompting import with_pad_token
from .loading import lazy_rollout_sampler, load_placed
from .problems import problem_source, step_generator, step_rng
from .resolved import ResolvedStage
from .rewards import stage_reward

Pairs = tuple[list[Problem], list[Problem], dict[str, float]]  # (chosen, rejected, metrics)
METRIC_PREFIX = {"dpo": "dpo", "reward_model": "rm"}
BuildPairs = Callable[[torch.nn.Module, int], Pairs]  # (the policy that samples, step) -> the step's pairs


def frozen(ctx: ResolvedStage, ref: str) -> torch.nn.Module:
    """A model the stage reads but never trains, on its device in its compute dtype."""
    return load_placed(ctx, ctx.model_refs[ref]).eval().requires_grad_(False)


def pairs_fn(ctx: ResolvedStage) -> BuildPairs:
    """The stage's pair builder for its `pairs_from`."""
    pairs_from = ctx.settings.pairs_from
    if isinstance(pairs_from, DatasetPairs):
        return dataset_pairs_fn(ctx, split_pairs(read_pairs(pairs_from.dataset))[0])
    source = problem_source(ctx)
    build = prompt_pairs_fn(ctx)
    return lambda model, step: build(model, source.draw(step_rng(ctx.seed, step), ctx.settings.batch_size),
                                     step_generator(ctx.seed, step))


def prompt_pairs_fn(ctx: ResolvedStage) -> Callable[[torch.nn.Module, list[Problem], torch.Generator], Pairs]:
    """The pairs of given prompts: delta pairs, or ranked samples of the model passed in (`pairs_from: policy`)."""
    pairs_from = ctx.settings.pairs_from
    return delta_pairs_fn(ctx, pairs_from) if isinstance(pairs_from, DeltaPairs) else policy_pairs_fn(ctx)


def policy_pairs_fn(ctx: ResolvedStage) -> Callable[[torch.nn.Module, list[Problem], torch.Generator], Pairs]:
    """Pairs from the policy's own samples: per prompt, the best-rewarded over the worst-rewarded (first of
    equals), skipped when they tie."""
    s = ctx.settings
    rollouts = lazy_rollout_sampler(ctx)
    domains = ctx.domain_map
    reward = stage_reward(ctx)

    def build(model, problems: list[Problem], generator: torch.Generator) -> Pairs:
        batch, metrics = rollout(model, ctx.tokenizer, problems, domains, s, temperature=s.temperature,
                                 generator=generator, sampler=rollouts(), prompt_format=ctx.prompt_format,
                                 reward=reward)
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
    s = ctx.settings
    prefix = METRIC_PREFIX[s.kind]
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
            f"{prefix}/strong_reward": mean([r for _, r in answers["strong"]]),
            f"{prefix}/weak_reward": mean([r for _, r in answers["weak"]]),
            "samples/student": 0,
            "samples/teacher": 2 * len(problems),
        }
        return [c for c, _ in kept], [r for _, r in kept], metrics

    return build


def dataset_pairs_fn(ctx: ResolvedStage, pairs: list[PreferencePair]) -> BuildPairs:
    """`batch_size` of the dataset's training pairs per step (all of them when fewer), drawn from (seed, step)."""
    n = ctx.settings.batch_size

    def build(model, step: int) -> Pairs:
        drawn = step_rng(ctx.seed, step).sample(pairs, min(n, len(pairs)))
        chosen, rejected = pair_rows(drawn)
        return chosen, rejected, {"samples/student": 0}

    return build


def pair_rows(pairs: list[PreferencePair]) -> tuple[list[Problem], list[Problem]]:
    """Dataset pairs as the (chosen, rejected) rows the preference losses read."""
    chosen = [Problem(prompt=p.prompt, answer=p.chosen, domain=p.domain, difficulty=0) for p in pairs]
    rejected = [Problem(prompt=p.prompt, answer=p.rejected, domain=p.domain, difficulty=0) for p in pairs]
    return chosen, rejected


def answered(p: Problem, completion: str) -> Problem:
    """`p` with `completion` as its answer: the row `supervised_batch` builds for a pair's side."""
    return Problem(prompt=p.prompt, answer=completion, domain=p.domain, difficulty=p.difficulty)


def mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)
