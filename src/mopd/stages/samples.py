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


LOGITS_BYTES = 256 * 2**20  # the student's float32 logits of one forward here: rows are taken this many at a time


def teacher_kl(ctx: ResolvedStage, teachers_at: Callable[[int], TeacherScorer]) -> TeacherKL:
    """The per-token teacher KL of a MOPD stage's rows: each row's own teacher (its domain's) from the panel of
    the step, the student's logprobs from its own forward (a greedy eval's sampler logprobs are 0), over as many
    rows at a time as keep its logits under LOGITS_BYTES (all of a tiny model's batch; one row of a real
    vocabulary's long window). Measured on the demo (900 held-out prompts, benchmarks/transcript_cost.py): the
    eval with the KL takes 2.7x the eval alone, where one row at a time took 5.5x."""

    @torch.no_grad()
    def kl(model: torch.nn.Module, batch: RolloutBatch, step: int) -> torch.Tensor:
        rows = [i for i, d in enumerate(batch.domains) if d in ctx.teacher_of_domain]
        out_B_T = torch.full(batch.input_ids_B_T.shape, float("nan"))
        if not rows:
            return out_B_T
        panel = teachers_at(step)
        sub = batch.select(torch.tensor(rows, device=batch.input_ids_B_T.device))
        names = panel.route(sub)
        teacher_b_T = panel.sampled_logprobs(sub, names).float().cpu()
        # a teacher of another tokenizer: its logprob of a chunk sits on the chunk's last token, so the KL summed over
        # a chunk's tokens is the chunk's; a token in no chunk has no teacher logprob (NaN: out of the turn's mean)
        chunks = panel.chunk_ids(sub, names)
        scored_b_T = torch.ones_like(teacher_b_T, dtype=torch.bool) if chunks is None else (chunks >= 0).cpu()
        was_training = model.training
        model.eval()
        B, T = sub.input_ids_B_T.shape
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2**17  # unknown: a large one
        step_rows = max(1, LOGITS_BYTES // (T * vocab * 4))
        for j in range(0, B, step_rows):
            ids_b_T = sub.input_ids_B_T[j : j + step_rows]
            student_b_T = token_logprobs(sequence_logits(model, ids_b_T, sub.attention_mask_B_T[j : j + step_rows]),
                                         ids_b_T).float().cpu()
            model_b_T = (sub.roles[j : j + step_rows] == ROLE_MODEL).cpu() & scored_b_T[j : j + step_rows]
            kl_b_T = torch.where(model_b_T, student_b_T - teacher_b_T[j : j + step_rows], float("nan"))
            out_B_T[rows[j : j + step_rows]] = kl_b_T
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
