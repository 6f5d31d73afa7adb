"""Sampling a step's rollouts a fixed number of groups at a time, each group from its own generator: the unit of
work that rollout workers share out.

Why: the whole-batch sampler draws every row's tokens from one generator and runs every row in one padded
forward, so a row's completion depends on which other rows were in its batch. Here the step's groups (the
`group_size` rows of one problem) are cut into calls of `groups_per_call` consecutive groups, fixed by the recipe;
a call runs its rows in one batched forward and draws each group's tokens from a generator seeded by (step
generator, group index) (`sampler.next_tokens_by_group`). A call's rows are then a function of its groups only,
so whichever worker samples it, and however many workers share the step (shards are cut at call boundaries), the
concatenated batch is the same tensors. `group_seeds` draws the seeds once, in the learner, in group order. One
group per call is the group-by-group sampling of earlier versions, token for token; more groups per call make
one forward serve them all (the cost of sampling group by group: docs/SCALING.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..core.batch import RolloutBatch

SEED_BOUND = 2**62


def group_seeds(generator: torch.Generator, groups: int) -> list[int]:
    """One seed per group, drawn from the step's generator (a function of (seed, step) only)."""
    return torch.randint(0, SEED_BOUND, (groups,), generator=generator).tolist()


def group_rows(group_ids: Sequence[int]) -> list[list[int]]:
    """Row indices of each group, groups in order of first appearance (rows of a group are contiguous)."""
    order: dict[int, list[int]] = {}
    for row, g in enumerate(group_ids):
        order.setdefault(int(g), []).append(row)
    return list(order.values())


def call_slices(groups: int, groups_per_call: int) -> list[slice]:
    """The step's groups cut into calls of `groups_per_call` consecutive groups (the last one shorter)."""
    return [slice(i, min(i + groups_per_call, groups)) for i in range(0, groups, groups_per_call)]


def sample_groups(sampler: Callable[..., RolloutBatch], model, tokenizer, prompts: list[str], *, seeds: list[int],
                  groups: list[list[int]], domains: list[str], group_ids: list[int], references: list[str],
                  groups_per_call: int = 1, **settings) -> list[RolloutBatch]:
    """The groups sampled by `sampler` (a `sample`-like callable), `groups_per_call` at a time, each group's
    tokens from its own seed; one batch per call, in order."""
    out = []
    for sl in call_slices(len(groups), groups_per_call):
        rows = [r for g in groups[sl] for r in g]

        def pick(xs: list, rows: list[int] = rows) -> list:
            return [xs[i] for i in rows] if xs else []

        draws = [(len(g), torch.Generator().manual_seed(seed)) for seed, g in zip(seeds[sl], groups[sl], strict=True)]
        out.append(sampler(model, tokenizer, pick(prompts), domains=pick(domains), group_ids=pick(group_ids),
                           references=pick(references), draw_groups=draws, **settings))
    return out


def grouped_sampler(sampler: Callable[..., RolloutBatch], groups_per_call: int = 1) -> Callable[..., RolloutBatch]:
    """`sampler` (with `sample`'s signature) turned into one that samples `groups_per_call` groups at a time, each
    group from its own seed: the in-process twin of the rollout workers, whose batches it equals for the same
    (seed, step)."""

    def sample_by_group(model, tokenizer, prompts: list[str], *, generator: torch.Generator,
                        domains: list[str], group_ids: list[int], references: list[str] | None = None,
                        **settings) -> RolloutBatch:
        groups = group_rows(group_ids)
        parts = sample_groups(sampler, model, tokenizer, prompts, seeds=group_seeds(generator, len(groups)),
                              groups=groups, domains=domains, group_ids=group_ids, references=references or [],
                              groups_per_call=groups_per_call, **settings)
        return concat_batches(parts, tokenizer.pad_token_id)

    return sample_by_group


def concat_batches(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Rows of `parts` in order, re-padded to one layout: prompts left-padded to the widest prompt, completions
    right-padded to the longest completion (padding carries mask 0, so every row's tokens and scores are kept)."""
    prompt_w = [_prompt_width(p) for p in parts]
    comp_w = [p.input_ids_B_T.shape[1] - w for p, w in zip(parts, prompt_w, strict=True)]
    P, N = max(prompt_w), max(comp_w)

    def widen(x: torch.Tensor, w: int, n: int, fill) -> torch.Tensor:
        rows = x.shape[0]
        left = torch.full((rows, P - w), fill, dtype=x.dtype, device=x.device)
        right = torch.full((rows, N - n), fill, dtype=x.dtype, device=x.device)
        return torch.cat([left, x, right], dim=1)

    def cat(field: str, fill) -> torch.Tensor:
        return torch.cat([widen(getattr(p, field), w, n, fill)
                          for p, w, n in zip(parts, prompt_w, comp_w, strict=True)])

    rewards = [p.rewards_B for p in parts]
    messages = [m for p in parts for m in (p.messages if len(p.messages) == p.size else [[]] * p.size)]
    roles = None if all(p.roles_B_T is None for p in parts) else torch.cat(
        [widen(p.roles, w, n, 0) for p, w, n in zip(parts, prompt_w, comp_w, strict=True)])
    return RolloutBatch(
        input_ids_B_T=cat("input_ids_B_T", pad_id),
        attention_mask_B_T=cat("attention_mask_B_T", 0),
        completion_mask_B_T=cat("completion_mask_B_T", 0.0),
        sampler_logprobs_B_T=cat("sampler_logprobs_B_T", 0.0),
        domains=[d for p in parts for d in p.domains],
        group_ids_B=torch.cat([p.group_ids_B for p in parts]),
        prompts=[x for p in parts for x in p.prompts],
        completions=[x for p in parts for x in p.completions],
        references=[x for p in parts for x in p.references],
        rewards_B=None if any(r is None for r in rewards) else torch.cat(rewards),
        roles_B_T=roles,
        messages=messages if any(messages) else [],
    )


def _prompt_width(batch: RolloutBatch) -> int:
    """Columns before the completion window: a sampler's batch is `[prompt P][completion N]`, and the first
    completion column is the first column where any row's completion mask is set (P when no row sampled any)."""
    any_B = batch.completion_mask_B_T.bool().any(0)
    if bool(any_B.any()):
        return int(any_B.long().argmax())
    return int(batch.input_ids_B_T.shape[1])
