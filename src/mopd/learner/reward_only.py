"""MOPD with reward-only domains (Nemotron 3 Ultra): a mopd stage's domains without a teacher are trained by GRPO
on their reward inside the same step.

A row of a reward-only domain is routed to no teacher (its name is None); its advantage is the GRPO advantage of
its group, A = A_GRPO (weight 1, not alpha: it is that row's only signal), and it has no teacher term. A row with
a teacher keeps exactly its MOPD advantage, A = A_OPD (+ alpha * A_GRPO). Teachers score only their own rows, so
a reward-only row costs no teacher pass. Only the sampled-token objective mixes the two kinds of rows (the loader
refuses reward-only domains with a distribution objective).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.batch import RolloutBatch
from ..core.scoring import TeacherScorer

Names = list[str | None]  # per row: its teacher, or None for a reward-only row


def route_rows(teachers: TeacherScorer, batch: RolloutBatch, reward_only: frozenset[str]) -> Names:
    """Each row's teacher (`teachers.route` over the rows that have one); None for a reward-only row."""
    if not reward_only:
        return list(teachers.route(batch))
    rows = [i for i, d in enumerate(batch.domains) if d not in reward_only]
    names: Names = [None] * batch.size
    if rows:
        for i, name in zip(rows, teachers.route(batch.select(torch.tensor(rows))), strict=True):
            names[i] = name
    return names


def teacher_rows(names_B: Names) -> list[int]:
    return [i for i, n in enumerate(names_B) if n is not None]


def scored_rows(
    score: Callable[[RolloutBatch, list[str]], torch.Tensor], batch: RolloutBatch, names_B: Names
) -> torch.Tensor:
    """`score(batch, names)` ([B, T]) of the rows with a teacher, 0 on reward-only rows (never scored)."""
    rows = teacher_rows(names_B)
    if len(rows) == batch.size:
        return score(batch, names_B)  # type: ignore[arg-type]  # every row has a teacher
    out = torch.zeros_like(batch.completion_mask_B_T)
    if rows:
        idx = torch.tensor(rows, device=out.device)
        out[idx] = score(batch.select(idx), [names_B[i] for i in rows]).to(out.dtype)
    return out


def chunk_layout(teachers: TeacherScorer, batch: RolloutBatch, names_B: Names) -> torch.Tensor | None:
    """Each completion token's aligned chunk ([B, T] long, `TeacherScorer.chunk_ids`) where a routed teacher
    has another tokenizer, -1 on reward-only rows; None when every teacher reads the student's own tokens."""
    rows = teacher_rows(names_B)
    if not rows:
        return None
    if len(rows) == batch.size:
        return teachers.chunk_ids(batch, names_B)  # type: ignore[arg-type]  # every row has a teacher
    idx = torch.tensor(rows, device=batch.input_ids_B_T.device)
    part = teachers.chunk_ids(batch.select(idx), [names_B[i] for i in rows])  # type: ignore[misc]
    if part is None:
        return None
    out = torch.full(batch.completion_mask_B_T.shape, -1, dtype=torch.long, device=part.device)
    out[idx.to(part.device)] = part
    return out


def reward_only_mask(names_B: Names, device: torch.device) -> torch.Tensor:
    """[B] bool: True on the rows of reward-only domains."""
    return torch.tensor([n is None for n in names_B], dtype=torch.bool, device=device)


def with_reward_only_rows(
    advantages_B_T: torch.Tensor, grpo_B_T: torch.Tensor | None, names_B: Names
) -> torch.Tensor:
    """The step's advantages: the teacher rows' as given, the reward-only rows' replaced by A_GRPO."""
    reward_only_B = reward_only_mask(names_B, advantages_B_T.device)
    if not bool(reward_only_B.any()):
        return advantages_B_T
    assert grpo_B_T is not None, "reward-only rows need GRPO advantages (batch_advantages computes them)"
    return torch.where(reward_only_B[:, None], grpo_B_T.to(advantages_B_T.dtype), advantages_B_T)
