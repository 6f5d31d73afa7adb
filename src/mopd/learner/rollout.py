"""Phases 1-2 of the policy step: sample G completions per problem, then reward each with its domain's verifier."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..core.batch import RolloutBatch
from ..core.schema import SamplingSettings
from ..envs import DomainLike, Problem
from ..models.prompting import RAW, PromptFormat
from ..sampling.sampler import sample


def rollout(
    model,
    tokenizer,
    problems: list[Problem],
    domains: Mapping[str, DomainLike],
    sampling: SamplingSettings,
    *,
    temperature: float,
    generator: torch.Generator,
    sampler: Callable[..., RolloutBatch] = sample,  # `sample` or a drop-in with its signature (vLLM)
    prompt_format: PromptFormat = RAW,
) -> tuple[RolloutBatch, dict[str, float]]:
    """The rewarded batch of a step: `sampling.group_size` rows per problem sharing a group id, each rewarded by
    `domains[row's domain].verify`; `temperature` is the step's (schedules change it per step).

    Returns:
        (batch with `rewards_B`, metrics: reward mean overall and per domain, completion length, temperature).
    """
    G = sampling.group_size
    rows = [p for p in problems for _ in range(G)]
    batch = sampler(
        model,
        tokenizer,
        [p.prompt for p in rows],
        max_new_tokens=sampling.max_new_tokens,
        temperature=temperature,
        top_p=sampling.top_p,
        generator=generator,
        domains=[p.domain for p in rows],
        group_ids=[i // G for i in range(len(rows))],
        references=[p.answer for p in rows],
        prompt_format=prompt_format,
    )
    mask_B_T = batch.completion_mask_B_T
    rewards_B = torch.tensor(
        [domains[p.domain].verify(p, c) for p, c in zip(rows, batch.completions, strict=True)],
        device=mask_B_T.device,
    )
    metrics: dict[str, float] = {
        "reward/mean": float(rewards_B.mean()),
        "completion_len": float(mask_B_T.sum(-1).mean()),
    }
    for d in sorted(set(batch.domains)):
        sel = torch.tensor([x == d for x in batch.domains], device=rewards_B.device)
        metrics[f"reward/{d}"] = float(rewards_B[sel].mean())
    metrics["sampling/temperature"] = temperature
    return batch.with_rewards(rewards_B), metrics
