"""The rollout batch: the one structure every stage after sampling reads.

Layout (B rows, T positions): each row is `[left padding][prompt][completion][right padding]`.
Every `*_B_T` tensor is aligned to `input_ids_B_T`: the value at [b, t] concerns the token input_ids[b, t]
(so a token's logprob sits at the token's own position, not at the position of the logits that predicted it).

Multi-turn rows (agents, `sampling.multi_turn`) put the environment's observations inside the completion window:
`roles_B_T` says who wrote each token (ROLE_PROMPT for prompt and padding, ROLE_MODEL, ROLE_ENV), and the
completion mask stays 1 on model tokens only, so every loss and advantage (all keyed on the completion mask)
skips observations while the teachers, which score `input_ids_B_T` under `attention_mask_B_T`, see them as
context. Single-turn rows leave `roles_B_T` None: their roles are the completion mask's (`roles`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

ROLE_PROMPT, ROLE_MODEL, ROLE_ENV = 0, 1, 2  # who wrote a token (roles_B_T); padding counts as prompt


@dataclass
class RolloutBatch:
    input_ids_B_T: torch.Tensor  # long; prompt (left-padded) + completion (right-padded)
    attention_mask_B_T: torch.Tensor  # long; 1 on real tokens (prompt and completion), 0 on padding
    completion_mask_B_T: torch.Tensor  # float; 1 on sampled completion tokens (EOS included), else 0
    sampler_logprobs_B_T: torch.Tensor  # float; log pi_sampler(token) on completion tokens, 0 elsewhere
    domains: list[str]  # domain name per row; the router reads it
    group_ids_B: torch.Tensor  # long; rows sampled from the same prompt share a group id
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)  # the domain's reference answer per row
    rewards_B: torch.Tensor | None = None  # float in [0, 1], set by the verifier phase
    roles_B_T: torch.Tensor | None = None  # long ROLE_* per token (multi-turn rows); None: single-turn
    # each row's conversation (multi-turn rows: user, assistant, tool messages), what a teacher of another tokenizer
    # re-renders with its own chat template (`teachers.cross_tokenizer`); empty: not kept
    messages: list[list[dict]] = field(default_factory=list)

    @property
    def roles(self) -> torch.Tensor:
        """Who wrote each token: `roles_B_T`, or for a single-turn batch ROLE_MODEL on the completion mask."""
        if self.roles_B_T is not None:
            return self.roles_B_T
        return self.completion_mask_B_T.long() * ROLE_MODEL

    @property
    def size(self) -> int:
        return int(self.input_ids_B_T.shape[0])

    @property
    def first_completion_column(self) -> int:
        """The column where completions start (prompts are left-padded to one width): everything before it is
        prompt, so only positions from the one before it on predict a completion token."""
        return int(self.completion_mask_B_T.any(0).long().argmax())

    def with_rewards(self, rewards_B: torch.Tensor) -> RolloutBatch:
        return replace(self, rewards_B=rewards_B)

    def real_columns(self) -> tuple[int, int]:
        """[start, stop): the columns where some row has a real token (outside them every row is padding)."""
        live = self.attention_mask_B_T.any(0)
        if not bool(live.any()):
            return 0, 0
        cols = live.nonzero().flatten()
        return int(cols[0]), int(cols[-1]) + 1

    def columns(self, start: int, stop: int) -> RolloutBatch:
        """Every row's columns [start, stop): with `real_columns`, the batch without its all-padding columns (a
        token's position id counts the real tokens before it, so no real token's logits change)."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, start:stop]

        return replace(self, input_ids_B_T=cut(self.input_ids_B_T), attention_mask_B_T=cut(self.attention_mask_B_T),
                       completion_mask_B_T=cut(self.completion_mask_B_T),
                       sampler_logprobs_B_T=cut(self.sampler_logprobs_B_T), roles_B_T=cut(self.roles_B_T))

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The same batch with every tensor on `device` (the text fields are shared, not copied)."""
        return replace(
            self,
            input_ids_B_T=self.input_ids_B_T.to(device),
            attention_mask_B_T=self.attention_mask_B_T.to(device),
            completion_mask_B_T=self.completion_mask_B_T.to(device),
            sampler_logprobs_B_T=self.sampler_logprobs_B_T.to(device),
            group_ids_B=self.group_ids_B.to(device),
            rewards_B=None if self.rewards_B is None else self.rewards_B.to(device),
            roles_B_T=None if self.roles_B_T is None else self.roles_B_T.to(device),
        )

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """Sub-batch of the given row indices (used to send each teacher only its routed rows)."""
        idx = rows.tolist()
        pick = lambda xs: [xs[i] for i in idx] if xs else []  # noqa: E731
        return RolloutBatch(
            input_ids_B_T=self.input_ids_B_T[rows],
            attention_mask_B_T=self.attention_mask_B_T[rows],
            completion_mask_B_T=self.completion_mask_B_T[rows],
            sampler_logprobs_B_T=self.sampler_logprobs_B_T[rows],
            domains=pick(self.domains),
            group_ids_B=self.group_ids_B[rows],
            prompts=pick(self.prompts),
            completions=pick(self.completions),
            references=pick(self.references),
            rewards_B=None if self.rewards_B is None else self.rewards_B[rows],
            roles_B_T=None if self.roles_B_T is None else self.roles_B_T[rows],
            messages=pick(self.messages),
        )


def rollout_batch(
    prompt_ids_B_P: torch.Tensor,
    prompt_mask_B_P: torch.Tensor,
    completion_ids_B_N: torch.Tensor,
    completion_logprobs_B_N: torch.Tensor,
    completion_mask_B_N: torch.Tensor,
    *,
    prompts: list[str],
    completions: list[str],
    domains: list[str] | None = None,
    group_ids: list[int] | None = None,
    references: list[str] | None = None,
    completion_roles_B_N: torch.Tensor | None = None,
) -> RolloutBatch:
    """The one constructor every sampler uses: left-padded prompts and right-padded completions -> the layout
    above, on the prompts' device. Without `group_ids` every row is its own group; without `domains`, rows
    carry an empty domain name. `completion_roles_B_N` (multi-turn: ROLE_MODEL / ROLE_ENV per completion column,
    ROLE_PROMPT on padding) sets `roles_B_T`; the completion mask must then be 1 exactly on ROLE_MODEL."""
    B, P = prompt_ids_B_P.shape
    dev = prompt_ids_B_P.device
    return RolloutBatch(
        input_ids_B_T=torch.cat([prompt_ids_B_P, completion_ids_B_N], dim=1),
        attention_mask_B_T=torch.cat([prompt_mask_B_P, completion_mask_B_N.long()], dim=1),
        completion_mask_B_T=torch.cat([torch.zeros(B, P, device=dev), completion_mask_B_N], dim=1),
        sampler_logprobs_B_T=torch.cat([torch.zeros(B, P, device=dev), completion_logprobs_B_N], dim=1),
        domains=list(domains) if domains else [""] * B,
        group_ids_B=torch.tensor(group_ids if group_ids is not None else list(range(B)), dtype=torch.long,
                                 device=dev),
        prompts=list(prompts),
        completions=completions,
        references=list(references) if references else [],
        roles_B_T=None if completion_roles_B_N is None else torch.cat(
            [torch.full((B, P), ROLE_PROMPT, dtype=torch.long, device=dev), completion_roles_B_N.long()], dim=1),
    )


def with_prompts(batch: RolloutBatch, prompt_ids: list[list[int]], pad_id: int) -> RolloutBatch:
    """The same completions after other prompts (a prompted teacher's rendering of each row's prompt).

    The new prompts are left-padded to their own width and the completion columns (from the batch's first
    completion column on) are kept as they are, so both batches end in the same columns: a score of the last
    `keep` positions of one is a score of the same tokens in the other, for any `keep` up to the completion
    window plus one (`tail_aligned`)."""
    first = batch.first_completion_column
    B = batch.size
    dev = batch.input_ids_B_T.device
    ids, mask = (x.to(dev) for x in left_padded(prompt_ids, pad_id))
    P = ids.shape[1]

    def joined(front: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.cat([front.to(t.dtype), t[:, first:]], dim=1)

    zeros = torch.zeros((B, P), device=dev)
    return replace(batch, input_ids_B_T=joined(ids, batch.input_ids_B_T),
                   attention_mask_B_T=joined(mask, batch.attention_mask_B_T),
                   completion_mask_B_T=joined(zeros, batch.completion_mask_B_T),
                   sampler_logprobs_B_T=joined(zeros, batch.sampler_logprobs_B_T),
                   roles_B_T=joined(torch.full((B, P), ROLE_PROMPT, device=dev), batch.roles_B_T))


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to the longest with `pad`: (ids, mask) [len(rows), width], long, on the CPU."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def tail_aligned(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x` [b, w, ...] as [b, width, ...] by its last columns: cut at the front, or zeros put in front."""
    w = x.shape[1]
    if w >= width:
        return x[:, w - width:]
    return torch.cat([x.new_zeros((x.shape[0], width - w, *x.shape[2:])), x], dim=1)
