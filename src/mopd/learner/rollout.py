"""Phases 1-2 of the policy step: sample G completions per problem, then reward each with its domain's verifier
(or the stage's reward model or judge);
and the best of n verified samples per problem (rejection sampling, off-policy traces)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from ..core.batch import RolloutBatch
from ..envs import DomainLike, Problem
from ..envs.tool_domains import is_agentic
from ..models.prompting import RAW, PromptFormat
from ..sampling.multi_turn import rollout_episodes
from ..sampling.sampler import sample

# a stage's reward source other than the domains' verifiers (a reward model, a judge): (problems, completions) ->
# one reward in [0, 1] per row (`learner.reward_model.reward_model_reward`, `learner.judge.judge_reward`)
RewardFn = Callable[[list[Problem], list[str]], list[float]]


def rewards_by_domain(sources: Mapping[str, RewardFn], domains: Mapping[str, DomainLike]) -> RewardFn:
    """One RewardFn from a source per listed domain (`reward: {per_domain: ...}`): each listed domain's rows go to
    its source in one call, every other row to its domain's verifier; rewards come back in the rows' order."""

    def score(rows: list[Problem], completions: list[str]) -> list[float]:
        out = [0.0] * len(rows)
        for domain in dict.fromkeys(p.domain for p in rows):
            idx = [i for i, p in enumerate(rows) if p.domain == domain]
            if domain in sources:
                values = sources[domain]([rows[i] for i in idx], [completions[i] for i in idx])
            else:
                values = [domains[domain].verify(rows[i], completions[i]) for i in idx]
            for i, v in zip(idx, values, strict=True):
                out[i] = float(v)
        return out

    return score


def row_rewards(
    rows: list[Problem], completions: list[str], domains: Mapping[str, DomainLike], reward: RewardFn | None
) -> list[float]:
    """Each row's reward: `reward`'s when given, else its domain's verifier's."""
    if reward is not None:
        return [float(r) for r in reward(rows, completions)]
    return [domains[p.domain].verify(p, c) for p, c in zip(rows, completions, strict=True)]


class RolloutSettings(Protocol):
    """What a rollout reads of a stage's settings (a sampling stage's `SamplingSettings`, a dpo stage)."""

    group_size: int
    max_new_tokens: int
    top_p: float


def rollout(
    model,
    tokenizer,
    problems: list[Problem],
    domains: Mapping[str, DomainLike],
    sampling: RolloutSettings,
    *,
    temperature: float,
    generator: torch.Generator,
    sampler: Callable[..., RolloutBatch] = sample,  # `sample` or a drop-in with its signature (vLLM)
    prompt_format: PromptFormat = RAW,
    reward: RewardFn | None = None,
) -> tuple[RolloutBatch, dict[str, float]]:
    """The rewarded batch of a step: `sampling.group_size` rows per problem sharing a group id, each rewarded by
    `domains[row's domain].verify`; `temperature` is the step's (schedules change it per step).

    Returns:
        (batch with `rewards_B`, metrics: reward mean overall and per domain, completion length, temperature).
    """
    if any(is_agentic(domains[p.domain]) for p in problems):  # tool-use episodes: multi-turn sampling, episode rewards
        batch, metrics = rollout_episodes(model, tokenizer, problems, domains, group_size=sampling.group_size,
                                          max_new_tokens=sampling.max_new_tokens, temperature=temperature,
                                          top_p=sampling.top_p, generator=generator, prompt_format=prompt_format)
        return batch, {**metrics, "sampling/temperature": temperature}
    rows = [p for p in problems for _ in range(sampling.group_size)]
    batch = sampler(model, tokenizer, **rollout_rows(problems, sampling.group_size),
                    max_new_tokens=sampling.max_new_tokens, temperature=temperature, top_p=sampling.top_p,
                    generator=generator, prompt_format=prompt_format)
    mask_B_T = batch.completion_mask_B_T
    rewards_B = torch.tensor(row_rewards(rows, batch.completions, domains, reward), device=mask_B_T.device)
    metrics: dict[str, float] = {
        "reward/mean": float(rewards_B.mean()),
        "completion_len": float(mask_B_T.sum(-1).mean()),
    }
    for d in sorted(set(batch.domains)):
        sel = torch.tensor([x == d for x in batch.domains], device=rewards_B.device)
        metrics[f"reward/{d}"] = float(rewards_B[sel].mean())
    metrics["sampling/temperature"] = temperature
    return batch.with_rewards(rewards_B), metrics


def rollout_rows(problems: list[Problem], group_size: int) -> dict[str, list]:
    """The sampler's row arguments of a step: each problem `group_size` times, rows of a problem one group."""
    rows = [p for p in problems for _ in range(group_size)]
    return {"prompts": [p.prompt for p in rows], "domains": [p.domain for p in rows],
            "group_ids": [i // group_size for i in range(len(rows))], "references": [p.answer for p in rows]}


def best_of_n(
    model,
    tokenizer,
    problems: list[Problem],
    domains: Mapping[str, DomainLike],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
    prompt_format: PromptFormat = RAW,
    reward: RewardFn | None = None,
) -> list[tuple[Problem, float]]:
    """Each problem's best of `n` answers sampled by `model` (the first of equal rewards), with its verifier
    reward: a Problem whose `answer` is that completion (what `supervised_loss` trains on).

    One `sample` call over the problems' rows in order (each repeated `n` times), so the answers are a function
    of the generator's state; n = 1 is one sampled answer per problem.
    """
    rows = [p for p in problems for _ in range(n)]
    batch = sample(model, tokenizer, [p.prompt for p in rows], max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, generator=generator, domains=[p.domain for p in rows],
                   prompt_format=prompt_format)
    rewards = [float(r) for r in row_rewards(rows, batch.completions, domains, reward)]
    P, eos = batch.first_completion_column, tokenizer.eos_token_id
    best = []
    for i, p in enumerate(problems):
        j = max(range(i * n, (i + 1) * n), key=rewards.__getitem__)  # max keeps the first of equal rewards
        # the answer's tokens as sampled (the text may re-encode to other ids), for `tokenizer` only
        ids = [t for t, m in zip(batch.input_ids_B_T[j, P:].tolist(), batch.completion_mask_B_T[j, P:].tolist(),
                                 strict=True) if m and t != eos]
        best.append((Problem(prompt=p.prompt, answer=batch.completions[j], domain=p.domain, difficulty=p.difficulty,
                             meta={"answer_ids": ids, "answer_tokenizer": tokenizer}), rewards[j]))
    return best
