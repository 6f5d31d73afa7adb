"""The in-process teacher panel: one frozen model per teacher, each scoring only the rows routed to it.

It implements `core.scoring.TeacherScorer`, the protocol the learner scores through.

Multi-teacher distillation is routing, not a new algorithm: `route_teachers` maps each row's domain to a
teacher name, the panel runs each teacher once on its own sub-batch, and the routed results are scattered
back into batch order. The panel returns exactly what the objective needs — one logprob per sampled token,
the teacher's top-k, or the full distribution — so the cheap objectives stay cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core.batch import RolloutBatch
from ..core.logprobs import token_logprobs
from ..learner.advantages import route_teachers
from ..models.forward import sequence_logits
from .offload import placed_on


@dataclass
class TeacherPanel:
    models: Mapping[str, torch.nn.Module]  # teacher name -> frozen model
    teacher_of_domain: Mapping[str, str]  # domain -> teacher name
    # where teachers score: None = where each one lives (resident); a device = moved there per call, then back
    # (teachers kept on CPU, accelerator memory bounded by student + largest teacher; see teachers/offload.py)
    compute_device: torch.device | None = None

    def _teacher_logits(
        self, name: str, ids_B_T: torch.Tensor, mask_B_T: torch.Tensor, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """The teacher's logits for its routed rows (the last `logits_to_keep` positions, when > 0), returned on
        the rows' device."""
        with placed_on(self.models[name], self.compute_device) as model:
            dev = next(model.parameters()).device
            logits = sequence_logits(model, ids_B_T.to(dev), mask_B_T.to(dev), logits_to_keep=logits_to_keep)
            return logits.to(ids_B_T.device)

    @staticmethod
    def _routed_rows(batch: RolloutBatch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A teacher's rows of ids and mask, minus the leading columns that are padding in every one of them.

        Why: the batch is left-padded to its longest prompt; a teacher that gets only its own domain's rows
        (similar prompt lengths) need not run over the other domains' padding. Position ids count real tokens,
        so dropping all-padding columns changes no logit. A teacher that gets every row indexes nothing (no
        copy of the batch). Returns (ids, mask, number of columns dropped).
        """
        every_row = rows.numel() == batch.size  # rows are ascending, so this is arange(B)
        ids = batch.input_ids_B_T if every_row else batch.input_ids_B_T[rows]
        mask = batch.attention_mask_B_T if every_row else batch.attention_mask_B_T[rows]
        start = int(mask.any(0).long().argmax())  # first column with a real token in some row
        return ids[:, start:], mask[:, start:], start

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
        # Only positions that predict a completion token need logits: from the column before the first
        # completion column to the end (the prompt's vocabulary projection is skipped).
        first = int(batch.completion_mask_B_T.any(0).long().argmax())
        for name, rows in self._rows_by_teacher(names_B).items():
            ids, mask, _ = self._routed_rows(batch, rows)
            keep = min(batch.input_ids_B_T.shape[1] - first + 1, ids.shape[1])
            logits = self._teacher_logits(name, ids, mask, logits_to_keep=keep)  # [b, keep, V]
            out_B_T[rows, -keep:] = token_logprobs(logits, ids[:, -keep:])
        return out_B_T * batch.completion_mask_B_T

    @torch.no_grad()
    def full_logits(self, batch: RolloutBatch, names_B: list[str], window: int | None = None) -> torch.Tensor:
        """The routed teacher's full next-token logits aligned to tokens: [B, T, V], or for the last `window`
        tokens only ([B, window, V]; column j concerns token T - window + j).

        A completion-only objective passes the completion window: at a real vocabulary the prompt positions'
        projection (and everything the loss would do to it) is most of the pass, as for `sampled_logprobs`.
        A token no position predicts within its teacher's trimmed rows (padding, or the first token) gets zeros.
        """
        width = batch.input_ids_B_T.shape[1] if window is None else window
        out: torch.Tensor | None = None
        for name, rows in self._rows_by_teacher(names_B).items():
            ids, mask, _ = self._routed_rows(batch, rows)
            keep = min(width + 1, ids.shape[1])  # the last position predicts past the row: computed, dropped
            aligned = self._teacher_logits(name, ids, mask, logits_to_keep=keep)[:, :-1]
            if keep == width + 1 and rows.numel() == batch.size:
                return aligned  # one teacher for the whole batch: its logits are the answer, no scatter copy
            if out is None:
                out = aligned.new_zeros((batch.size, width, aligned.shape[-1]))
            out[rows, width - aligned.shape[1] :] = aligned
        assert out is not None
        return out

    @torch.no_grad()
    def topk(
        self, batch: RolloutBatch, names_B: list[str], k: int, window: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routed teacher's top-k logprobs and token ids per position ([B, W, K] each, W = T or `window`, as
        `full_logits`), plus the logprob of each sampled token ([B, T], 0 off the completion): what a remote
        teacher would ship."""
        logprobs = self.full_logits(batch, names_B, window).log_softmax(-1)
        top_lp, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        W = logprobs.shape[1]
        sampled = logprobs.gather(-1, batch.input_ids_B_T[:, -W:, None]).squeeze(-1)
        sampled_B_T = torch.cat([sampled.new_zeros(batch.size, batch.input_ids_B_T.shape[1] - W), sampled], dim=1)
        return top_lp, top_ids, sampled_B_T * batch.completion_mask_B_T

