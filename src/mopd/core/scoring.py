"""What the learner asks of a panel of teachers: the one scoring protocol every teacher backend implements.

Why a protocol in the bottom layer: the learner computes advantages and losses from teacher scores and must not
care whether a teacher runs in this process, on a Ray worker or behind an HTTP server; the teachers layer
implements this (`teachers.panel.TeacherPanel` in process) and the learner imports only this file.
Every method scores the rows routed to each teacher and returns results in batch order.

`logit_blocks` is how the full-distribution objectives read a teacher without [B, K, V] logits: the learner asks
for the block of positions it is differentiating, and an in-process backend keeps only its final hidden states
and applies its LM head per block. A backend that can only ship whole logits returns
`blocks_of(full logits)`.

Rows of a teacher of another tokenizer (`chunk_ids` is not None; `teachers.cross_tokenizer.ForeignTeacher`) are
in the student's positions and vocabulary too, but only at the student's single-token chunks and over the tokens
both vocabularies share (`teachers.shared_support`): `logit_blocks` gives the teacher's logits there at the
shared tokens' student ids and -inf at the others, and an all -inf row at every other position; `topk` gives the
teacher's top-k tokens that the student has (-inf log-probabilities where fewer than k are, repeating the first
id; all -inf where there is no term) and, as its third answer, each chunk's logprob on its last student token
(as `sampled_logprobs`). The learner restricts both distributions to that support
(`learner.objective_table.restrict_to_shared`); rows of the student's own tokenizer are finite, and there the
restriction is the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from .batch import RolloutBatch

# blocks(start, stop, rows) -> the logits of positions [start, stop) of the last `keep` positions of the batch
# rows `rows` (ascending; None: every row), [len(rows), stop - start, V]
LogitBlocks = Callable[[int, int, torch.Tensor | None], torch.Tensor]


class TeacherScorer(Protocol):
    def route(self, batch: RolloutBatch) -> list[str]:
        """The teacher name of each row (its domain's teacher)."""
        ...

    def sampled_logprobs(self, batch: RolloutBatch, names_B: list[str]) -> torch.Tensor:
        """log pi_T(y_t) of each sampled token under the row's teacher: [B, T], 0 off the completion."""
        ...

    def topk(
        self, batch: RolloutBatch, names_B: list[str], k: int, window: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k logprobs and ids over the last `window` tokens ([B, W, K] each) and the sampled tokens'
        logprobs ([B, T])."""
        ...

    def full_logits(self, batch: RolloutBatch, names_B: list[str], window: int | None = None) -> torch.Tensor:
        """Full next-token logits aligned to the last `window` tokens: [B, W, V]."""
        ...

    def chunk_ids(self, batch: RolloutBatch, names_B: list[str]) -> torch.Tensor | None:
        """None when every routed teacher reads the student's tokens; else [B, T] long: each completion token's
        chunk in its row (the tokens a teacher of another tokenizer scores as one string, whose teacher logprob
        `sampled_logprobs` puts on one of them; `teachers.cross_tokenizer`), -1 for a token in no chunk. Rows of
        same-tokenizer teachers have one chunk per token."""
        ...

    def logit_blocks(self, batch: RolloutBatch, names_B: list[str], keep: int) -> LogitBlocks:
        """The routed teacher's next-token logits at the last `keep` positions, a block at a time: `blocks(start,
        stop, rows)` is `sequence_logits(teacher, ..., logits_to_keep=keep)[rows, start:stop]` ([b, stop - start,
        V]; position j predicts the token at column T - keep + j + 1), zeros at positions before a row's tokens.
        `rows` None is every row; a subset is what the learner asks for when the others are padding there."""
        ...


def blocks_of(logits_B_K_V: torch.Tensor) -> LogitBlocks:
    """`logit_blocks` of a backend that computed every position's logits at once (no memory saved)."""
    return lambda start, stop, rows=None: logits_B_K_V[:, start:stop] if rows is None else logits_B_K_V[rows, start:stop]
