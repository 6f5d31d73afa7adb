"""A stage's transcripts (`eval.transcripts`): every held-out eval's, and a sampling stage's logged rollouts.

Why here: what a transcript carries beyond the batch needs the stage, the teachers of a MOPD stage for the
per-turn teacher KL, and its seed, for which rollouts a logged step keeps. Nothing here changes a trained number:
the rows are drawn with their own generator, and the KL is one more forward of the student and the teachers
outside the loss, with no draw.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from ..core.batch import ROLE_MODEL, RolloutBatch
from ..core.logprobs import token_logprobs
from ..core.scoring import TeacherScorer
from ..eval.transcripts import sampled_rows, samples_path, transcripts, write_transcripts
from ..models.forward import sequence_logits
from .resolved import ResolvedStage

# (student, rewarded batch, 0-based step) -> per-token log pi_S - log pi_T on model tokens [B, T] under the
# teachers of that step (NaN on rows without a teacher)
TeacherKL = Callable[[torch.nn.Module, RolloutBatch, int], torch.Tensor]


def teacher_kl(ctx: ResolvedStage, teachers_at: Callable[[int], TeacherScorer]) -> TeacherKL:
    """The per-token teacher KL of a MOPD stage's rows: each row's own teacher (its domain's) from the panel of
    the step, the student's logprobs from a forward of one row at a time (a greedy eval's sampler logprobs are 0,
    and one row at a time keeps a real vocabulary's logits small)."""

    @torch.no_grad()
    def kl(model: torch.nn.Module, batch: RolloutBatch, step: int) -> torch.Tensor:
        rows = [i for i, d in enumerate(batch.domains) if d in ctx.teacher_of_domain]
        out_B_T = torch.full(batch.input_ids_B_T.shape, float("nan"))
        if not rows:
            return out_B_T
        panel = teachers_at(step)
        sub = batch.select(torch.tensor(rows, device=batch.input_ids_B_T.device))
        teacher_b_T = panel.sampled_logprobs(sub, panel.route(sub)).float().cpu()
        was_training = model.training
        model.eval()
        for j, b in enumerate(rows):
            ids_1_T = sub.input_ids_B_T[j : j + 1]
            student_1_T = token_logprobs(sequence_logits(model, ids_1_T, sub.attention_mask_B_T[j : j + 1]),
                                         ids_1_T).float().cpu()
            model_1_T = (sub.roles[j : j + 1] == ROLE_MODEL).cpu()
            out_B_T[b] = torch.where(model_1_T, student_1_T - teacher_b_T[j : j + 1], float("nan"))[0]
        model.train(was_training)
        return out_B_T

    return kl


class EvalTranscripts:
    """Collects one eval's transcripts (`on_batch` of `eval.evaluate`) and writes them as `eval-<step>.jsonl`."""

    def __init__(self, ctx: ResolvedStage, model: torch.nn.Module, tokenizer, step: int,
                 kl: TeacherKL | None = None, extra: dict[str, Any] | None = None):
        self.ctx, self.model, self.tokenizer, self.step, self.kl, self.extra = ctx, model, tokenizer, step, kl, extra
        self.records: list[dict[str, Any]] = []

    def __call__(self, batch: RolloutBatch) -> None:
        kl_B_T = self.kl(self.model, batch, max(self.step - 1, 0)) if self.kl is not None else None
        self.records += transcripts(batch, self.tokenizer, step=self.step, kind="eval", kl_B_T=kl_B_T,
                                    extra=self.extra)

    def write(self) -> None:
        write_transcripts(samples_path(self.ctx.stage_dir, "eval", self.step), self.records)


def log_training_samples(ctx: ResolvedStage, model: torch.nn.Module, batch: RolloutBatch, step: int,
                         kl: TeacherKL | None = None) -> None:
    """At every `log_samples`-th step (1-based `step`), `SAMPLES_PER_DOMAIN` rollouts of each domain, drawn with
    a generator of their own seeded by (seed, step), written as `train-<step>.jsonl`."""
    every = getattr(ctx.settings, "log_samples", 0)
    if not every or step % every:
        return
    rows = sampled_rows(batch.domains, random.Random(f"{ctx.seed}:samples:{step}"))
    sub = batch.select(torch.tensor(rows, device=batch.input_ids_B_T.device))
    kl_B_T = kl(model, sub, step - 1) if kl is not None else None
    records = transcripts(sub, ctx.tokenizer, step=step, kind="train", kl_B_T=kl_B_T)
    write_transcripts(samples_path(ctx.stage_dir, "train", step), records)
