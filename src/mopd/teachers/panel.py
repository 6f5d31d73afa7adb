"""The teacher panel: one frozen model per teacher, each scoring only the rows routed to it.

Multi-teacher distillation is routing, not a new algorithm: `route_teachers` maps each row's domain to a
teacher name, the panel runs each teacher once on its own sub-batch, and the routed results are scattered
back into batch order. The panel returns exactly what the objective needs — one logprob per sampled token,
the teacher's top-k, or the full distribution — so the cheap objectives stay cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..learner.advantages import route_teachers
from ..learner.batch import RolloutBatch
from ..learner.logprobs import token_logprobs
from ..models.forward import sequence_logits


def _aligned_logits(logits_B_T_V: torch.Tensor) -> torch.Tensor:
    """Shift logits so position t holds the distribution that produced token t (position 0: zeros)."""
    return torch.cat([torch.zeros_like(logits_B_T_V[:, :1]), logits_B_T_V[:, :-1]], dim=1)


@dataclass
class TeacherPanel:
    models: Mapping[str, torch.nn.Module]  # teacher name -> frozen model
    teacher_of_domain: Mapping[str, str]  # domain -> teacher name

    def route(self, batch: RolloutBatch) -> list[str]:
        return route_teachers(batch.domains, self.teacher_of_domain)

    def _rows_by_teacher(self, names_B: list[str]) -> dict[str, torch.Tensor]:
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names_B):
            rows.setdefault(name, []).append(i)
        return {name: torch.tensor(idx, dtype=torch.long) for name, idx in rows.items()}

    @torch.no_grad()
    def sampled_logprobs(self, batch: RolloutBatch, names_B: list[str]) -> torch.Tensor:
        """log pi_T(y_t) of each sampled token under the row's routed teacher: [B, T]."""
        out_B_T = torch.zeros_like(batch.sampler_logprobs_B_T)
        for name, rows in self._rows_by_teacher(names_B).items():
            ids, mask = batch.input_ids_B_T[rows], batch.attention_mask_B_T[rows]
            logits = sequence_logits(self.models[name], ids, mask)
            out_B_T[rows] = token_logprobs(logits, ids)
        return out_B_T * batch.completion_mask_B_T

    @torch.no_grad()
    def full_logits(self, batch: RolloutBatch, names_B: list[str]) -> torch.Tensor:
        """The routed teacher's full next-token logits, aligned to tokens: [B, T, V]."""
        out: torch.Tensor | None = None
        for name, rows in self._rows_by_teacher(names_B).items():
            ids, mask = batch.input_ids_B_T[rows], batch.attention_mask_B_T[rows]
            logits = _aligned_logits(sequence_logits(self.models[name], ids, mask))
            if out is None:
                out = logits.new_zeros((batch.size, *logits.shape[1:]))
            out[rows] = logits
        assert out is not None
        return out

    @torch.no_grad()
    def topk(self, batch: RolloutBatch, names_B: list[str], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed teacher's top-k logprobs and token ids per position: ([B, T, K], [B, T, K])."""
        logprobs = self.full_logits(batch, names_B).log_softmax(-1)
        return logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
