"""Batched multi-turn sampling: every row plays an episode, and one KV cache is carried across its turns.

Lockstep layout: each decode step writes one column for every row: a sampled model token, the next token of a
pending observation (teacher-forced), or padding once the row's episode ended. So a row's completion window is
contiguous, `[prompt][turn 1 <eos>][observation 1][turn 2 <eos>]...`, and the batch has the single-turn layout
(`core.batch`) with `roles_B_T` saying who wrote each token: the completion mask (the loss mask downstream) is
1 on model tokens only, sampler logprobs exist for model tokens only, and teachers scoring `input_ids_B_T` see the
observations as context. Observations are appended to the cache, never recomputed: a row's observation tokens
go through the cached decode step beside the other rows' model tokens, and when every live row is feeding an
observation they go in as one multi-token step (a prefill of the observation); `recompute=True` instead rebuilds the cache from the whole prefix whenever a row starts
a new turn (what a loop of single-turn generate calls does), which the equality test and
benchmarks/multi_turn_cache.py compare against.

A row's episode ends at its final answer, at the environment's turn limit, or when its completion window
reaches its token budget (`EpisodeRow.budget`; the episode is then `cut`).

Tools do not run inside the row loop: a row whose turn ends submits it (`envs.episode.submit_turn`, which starts
its tool calls on threads or worker processes), the batch's next forward runs while they work, and the replies
are collected, in row order, before the next column is written. So the calls of every row that ended a turn at
one step, and the calls of one turn, run at the same time, and the batch waits for the slowest, once; the
results are applied in row and call order, so the batch is the same whatever the tools' timing.

With `overlap_tools` (a domain's `Limits.overlap_tools`) a row whose tools still run holds instead: a masked
column that does not advance its positions, while the others decode; the holds are removed at the end, and each
row draws from its own random stream, so its tokens do not depend on how long it held (`sample_episodes`).
benchmarks/tool_latency.py measures the three ways (inline, waiting at the next step, overlapped).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core.batch import ROLE_ENV, ROLE_MODEL, ROLE_PROMPT, RolloutBatch, left_padded, rollout_batch
from ..envs import DomainLike, Problem
from ..envs.episode import (
    Episode,
    EpisodeStats,
    PendingReply,
    SingleTurnEpisode,
    observation_ids,
    prompt_ids,
    submit_turn,
)
from ..envs.tool_domains import is_agentic
from ..envs.tools import Tool
from ..models.forward import accepts, position_ids_from_mask
from ..models.prompting import RAW, PromptFormat
from .sampler import completion_text, kv_cache, next_tokens, on_device


@dataclass
class EpisodeRow:
    problem: Problem
    episode: Episode
    budget: int  # completion-window tokens (model and observation)
    tools: Mapping[str, Tool] | None = None  # shown to a chat template; None for a single-turn row
    overlap_tools: bool = False  # its domain's `Limits.overlap_tools`: the batch decodes while its tools run


@torch.no_grad()
def sample_episodes(
    model,
    tokenizer,
    rows: list[EpisodeRow],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    group_ids: list[int] | None = None,
    prompt_format: PromptFormat = RAW,
    recompute: bool = False,
    overlap_tools: bool | None = None,
) -> tuple[RolloutBatch, list[EpisodeStats]]:
    """Play every row's episode to its end; returns the rewarded batch (with `roles_B_T`) and each episode's
    stats. Completions are the decoded windows, EOS marks included (the reward came from the episode).

    `overlap_tools`: a row whose tools still run holds (a masked column that does not advance its positions)
    while the other rows decode, and the holds are removed from the batch at the end; each row then draws from
    its own random stream (seeded from `generator`), so its tokens do not depend on how long it held. Without
    it the batch waits for the tools at the next step (module docstring), bit for bit the same in any timing.
    None: on when a row's domain asks for it (`EpisodeRow.overlap_tools`).
    """
    if overlap_tools is None:
        overlap_tools = any(r.overlap_tools for r in rows)
    if overlap_tools and recompute:
        raise ValueError("recompute is the cache benchmark's baseline; it does not overlap tools")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    chat = prompt_format.chat_template
    starts = [prompt_ids(tokenizer, prompt_format, r.problem.prompt, r.tools if chat else None) for r in rows]
    prompt_B_P, pmask_B_P = (x.to(dev) for x in left_padded(starts, tokenizer.pad_token_id))
    generator = on_device(generator, dev)
    B, P = prompt_B_P.shape
    N = max(r.budget for r in rows)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids_B_N = torch.full((B, N), pad, dtype=torch.long, device=dev)
    lp_B_N = torch.zeros((B, N), device=dev)
    roles: list[list[int]] = [[] for _ in range(B)]
    pending: list[list[int]] = [[] for _ in range(B)]  # observation tokens still to feed
    turn: list[list[int]] = [[] for _ in range(B)]  # the current model turn's tokens
    done = [False] * B
    used = [0] * B  # window tokens written per row (holds not counted): the budget is on these
    waiting: dict[int, PendingReply] = {}  # rows whose turn's tools are running
    holds: list[set[int]] = [set() for _ in range(B)]  # columns a row held in (overlap_tools)
    rewards = [0.0] * B
    keep_last = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    full_mask = torch.cat([pmask_B_P, torch.zeros((B, N), dtype=torch.long, device=dev)], dim=1)
    row_gens = None
    if overlap_tools and temperature > 0:  # one stream per row: a row's draws do not depend on its holds
        seeds = torch.randint(0, 2**62, (B,), generator=generator, device=generator.device if generator else "cpu")
        row_gens = [torch.Generator(device=dev).manual_seed(int(x)) for x in seeds]

    def forward(input_ids: torch.Tensor, width: int, position_ids: torch.Tensor, cache: dict) -> torch.Tensor:
        out = model(input_ids=input_ids, attention_mask=full_mask[:, :width], position_ids=position_ids,
                    use_cache=True, **cache, **keep_last)
        return out.logits[:, -1].float()

    def write(b: int, t: int, tok: int, tok_lp: float) -> bool:
        """Column t of row b; True when it ends the row's observation (its next column is a model turn's)."""
        r, ends_observation = rows[b], False
        if done[b] or b in waiting:  # ended, or holding while its tools run (overlap_tools)
            roles[b].append(ROLE_PROMPT)
            if not done[b]:
                holds[b].add(t)
            return False
        used[b] += 1
        if pending[b]:
            ids_B_N[b, t] = pending[b].pop(0)
            roles[b].append(ROLE_ENV)
            ends_observation = not pending[b]
        else:
            ids_B_N[b, t], lp_B_N[b, t] = tok, tok_lp
            roles[b].append(ROLE_MODEL)
            turn[b].append(tok)
            if tok == eos:
                waiting[b] = submit_turn(r.episode, completion_text(tokenizer, turn[b][:-1]))
                turn[b] = []
                if waiting[b].immediate or used[b] >= r.budget:  # no tool ran, or its window is full (cut below)
                    receive(b)
        if not done[b] and used[b] >= r.budget:  # the window is full: the episode is cut here
            done[b], rewards[b] = True, r.episode.cut(completion_text(tokenizer, turn[b]))
        return ends_observation

    def receive(b: int) -> None:
        """Row b's reply (waiting on its tools if they still run): the end of its episode, or its observation."""
        reply = waiting.pop(b).reply()
        if reply.observation is None:
            done[b], rewards[b] = True, reply.reward
        else:
            pending[b] = observation_ids(tokenizer, prompt_format, rows[b].episode.messages,
                                         rows[b].tools if chat else None)

    def draw(logits: torch.Tensor) -> tuple[list[int], list[float]]:
        if row_gens is None:
            return tuple(x.tolist() for x in next_tokens(logits, temperature, top_p, generator))  # type: ignore
        toks, lps = [0] * B, [0.0] * B
        for b in range(B):  # only rows that write a model token draw, each from its own stream
            if not done[b] and b not in waiting and not pending[b]:
                tok, lp = next_tokens(logits[b : b + 1], temperature, top_p, row_gens[b])
                toks[b], lps[b] = int(tok), float(lp)
        return toks, lps

    cache = kv_cache(model)
    logits = forward(prompt_B_P, P, position_ids_from_mask(pmask_B_P), cache)
    next_pos = pmask_B_P.sum(-1, keepdim=True)
    t = 0
    while True:
        for b in sorted(waiting):  # the replies of the turns that ended, in row order
            if not overlap_tools or waiting[b].ready():
                receive(b)
        if overlap_tools and waiting and all(done[b] or b in waiting for b in range(B)):
            receive(min(waiting))  # no row can write: wait for one (which one does not change any row's tokens)
        if all(done) or (t >= N and not overlap_tools):
            break
        # Every live row feeding an observation: k of its tokens go in one cached step (a prefill), no draw.
        feeding = [len(pending[b]) for b in range(B) if not done[b]]
        k = (min(*feeding, N - t) if not overlap_tools else min(feeding)) if all(feeding) else 1
        if t + k > ids_B_N.shape[1]:  # holds made the window longer than the budget: grow it
            more = max(k, N)
            ids_B_N = torch.cat([ids_B_N, torch.full((B, more), pad, dtype=torch.long, device=dev)], 1)
            lp_B_N = torch.cat([lp_B_N, torch.zeros((B, more), device=dev)], 1)
            full_mask = torch.cat([full_mask, torch.zeros((B, more), dtype=torch.long, device=dev)], 1)
        toks, tok_lps = ([0] * B, [0.0] * B) if all(feeding) else draw(logits)
        held = [b in waiting and not done[b] for b in range(B)]
        new_turn = False
        for j in range(t, t + k):
            for b in range(B):
                new_turn |= write(b, j, toks[b], tok_lps[b])
            full_mask[:, P + j] = torch.tensor([int(rl[j] != ROLE_PROMPT) for rl in roles], device=dev)
        t += k
        if all(done) and not waiting:
            break
        if recompute and new_turn:  # the baseline: a row starts a turn, so re-read every row's whole prefix
            cache = kv_cache(model)
            mask = full_mask[:, : P + t]
            logits = forward(torch.cat([prompt_B_P, ids_B_N[:, :t]], 1), P + t, position_ids_from_mask(mask), cache)
            next_pos = mask.sum(-1, keepdim=True)
        else:
            logits = forward(ids_B_N[:, t - k : t], P + t, next_pos + torch.arange(k, device=dev), cache)
            # a row that held keeps its position for its next real token
            next_pos = next_pos + k - torch.tensor(held, dtype=torch.long, device=dev)[:, None] * k
    steps = t
    if was_training:
        model.train()

    if any(holds):  # remove each row's holds: the batch a run that never waited would have written
        kept = [[j for j in range(steps) if j not in holds[b]][: used[b]] for b in range(B)]
        steps = max(used)
        ids, lps = torch.full((B, steps), pad, dtype=torch.long, device=dev), torch.zeros((B, steps), device=dev)
        for b, cols in enumerate(kept):
            index = torch.tensor(cols, dtype=torch.long, device=dev)
            ids[b, : len(cols)], lps[b, : len(cols)] = ids_B_N[b, index], lp_B_N[b, index]
            roles[b] = [roles[b][j] for j in cols] + [ROLE_PROMPT] * (steps - len(cols))
        ids_B_N, lp_B_N = ids, lps
    roles_B_N = torch.tensor([rl[:steps] for rl in roles], dtype=torch.long, device=dev).reshape(B, steps)
    model_B_N = (roles_B_N == ROLE_MODEL).float()
    ids_B_N, lp_B_N = ids_B_N[:, :steps], lp_B_N[:, :steps] * model_B_N
    stats = [r.episode.stats for r in rows]
    for s, rl in zip(stats, roles_B_N, strict=True):
        s.tokens = int((rl != ROLE_PROMPT).sum())
    completions = [completion_text(tokenizer, [i for i, rl in zip(row.tolist(), rrow.tolist(), strict=True) if rl])
                   for row, rrow in zip(ids_B_N, roles_B_N, strict=True)]
    batch = rollout_batch(prompt_B_P, pmask_B_P, ids_B_N, lp_B_N, model_B_N, prompts=[r.problem.prompt for r in rows],
                          completions=completions, domains=[r.problem.domain for r in rows], group_ids=group_ids,
                          references=[r.problem.answer for r in rows], completion_roles_B_N=roles_B_N)
    # rollout_batch's attention mask is the completion mask: observations are real tokens too
    batch.attention_mask_B_T[:, P:] = (roles_B_N != ROLE_PROMPT).long()
    batch.messages = [[dict(m) for m in r.episode.messages] for r in rows]  # re-rendered by a foreign teacher
    return batch.with_rewards(torch.tensor(rewards, device=dev)), stats


def episode_metrics(stats: list[EpisodeStats], domains: list[str]) -> dict[str, float]:
    """Per-episode means: turns, tool calls, tool errors (of which malformed calls: not JSON, unknown tool, bad
    arguments, over `max_parallel_calls`), user-simulator turns, the per-turn rewards' sum, episode length (window
    tokens), the share of episodes that called a tool, and per domain the tool-call rate and length."""
    n = max(len(stats), 1)
    metrics = {
        "episode/turns": sum(s.turns for s in stats) / n,
        "episode/tool_calls": sum(s.tool_calls for s in stats) / n,
        "episode/tool_errors": sum(s.tool_errors for s in stats) / n,
        "episode/malformed_calls": sum(s.malformed_calls for s in stats) / n,
        "episode/user_turns": sum(s.user_turns for s in stats) / n,
        "episode/turn_reward": sum(sum(s.turn_rewards) for s in stats) / n,
        "episode/length": sum(s.tokens for s in stats) / n,
        "episode/tool_call_rate": sum(s.tool_calls > 0 for s in stats) / n,
        "episode/cut_rate": sum(s.cut for s in stats) / n,
    }
    for d in sorted(set(domains)):
        mine = [s for s, x in zip(stats, domains, strict=True) if x == d]
        metrics[f"episode/tool_call_rate/{d}"] = sum(s.tool_calls > 0 for s in mine) / len(mine)
        metrics[f"episode/length/{d}"] = sum(s.tokens for s in mine) / len(mine)
    return metrics


def episode_rows(problems: list[Problem], domains: Mapping[str, DomainLike], max_new_tokens: int,
                 chat: bool = False) -> list[EpisodeRow]:
    """A row per problem: an agentic domain's episode within its own token budget, a single-turn domain's
    problem as a one-turn episode within `max_new_tokens` (so both kinds share a batch)."""
    out = []
    for p in problems:
        d = domains[p.domain]
        if is_agentic(d):
            out.append(EpisodeRow(p, d.start(p, chat=chat), d.limits.max_tokens, d.tools,
                                  getattr(d.limits, "overlap_tools", False)))
        else:
            out.append(EpisodeRow(p, SingleTurnEpisode(p, d.verify), max_new_tokens))
    return out


def rollout_episodes(
    model, tokenizer, problems: list[Problem], domains: Mapping[str, DomainLike], *, group_size: int,
    max_new_tokens: int, temperature: float, top_p: float, generator: torch.Generator | None,
    prompt_format: PromptFormat = RAW,
) -> tuple[RolloutBatch, dict[str, float]]:
    """`learner.rollout.rollout` for a batch with agentic domains: `group_size` episodes per problem (one group),
    rewarded by their episodes; the rollout's metrics plus `episode_metrics`."""
    rows = [p for p in problems for _ in range(group_size)]
    batch, stats = sample_episodes(model, tokenizer, episode_rows(rows, domains, max_new_tokens,
                                                                  prompt_format.chat_template),
                                   temperature=temperature, top_p=top_p, generator=generator,
                                   group_ids=[i // group_size for i in range(len(rows))], prompt_format=prompt_format)
    assert batch.rewards_B is not None
    metrics = {"reward/mean": float(batch.rewards_B.mean()),
               "completion_len": float(batch.completion_mask_B_T.sum(-1).mean())}
    for d in sorted(set(batch.domains)):
        metrics[f"reward/{d}"] = float(batch.rewards_B[[x == d for x in batch.domains]].mean())
    return batch, {**metrics, **episode_metrics(stats, batch.domains)}
