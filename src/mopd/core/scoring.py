"""What the learner asks of a panel of teachers: the one scoring protocol every teacher backend implements.

Why a protocol in the bottom layer: the learner computes advantages and losses from teacher scores and must not
care whether a teacher runs in this process, on a Ray worker or behind an HTTP server; the teachers layer
implements this (`teachers.panel.TeacherPanel` in process) and the learner imports only this file.
Every method scores the rows routed to each teacher and returns results in batch order.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .batch import RolloutBatch


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
