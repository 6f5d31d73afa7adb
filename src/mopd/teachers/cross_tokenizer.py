"""A teacher of another tokenizer: the student's rollouts re-rendered and re-tokenized for it, its scores aligned.

Why: the best teacher of a domain is often of another model family (another vocabulary and chat template). Its
logprobs of the student's token ids mean nothing, but its logprob of the student's *text* does. Each routed row is
turned into the teacher's own reading of it: the prompt rendered with the teacher's prompt format (its chat
template when the recipe uses chat templates), each model turn's text tokenized by the teacher's tokenizer,
each observation's text as context, and the teacher's end-of-turn token where the student's turn ended with its
own. The teacher scores that batch wherever it runs (in this process, a Ray actor, an HTTP server: any
`remote.RemoteTeacher` over its own token ids). Its token logprobs are then summed over the aligned chunks of
`core.token_chunks` and each chunk's sum is put on the chunk's last student token; `chunk_ids` says which
student tokens form each chunk, so the learner compares log pi_T(chunk) with log pi_S(chunk) (docs/CROSS_TOKENIZER.md).

A student's special token is a chunk of its own with the teacher's special token of the same string, and the
student's end token with the teacher's, whatever their strings (both say "the turn ends here"). A special token the
teacher lacks (a template token of one side only) is in no chunk and carries no advantage; a run of text whose
tokens do not reproduce it (`models.token_bytes` finds no convention) is left unaligned. Both are counted
(`describe`).

The distribution-level objectives (`topk`, `full_reverse_kl`, `forward_kl`, `jsd`) read the teacher's next-token
distributions at the student's single-token chunks (one token on each side), over the tokens both vocabularies
spell alike (`models.shared_vocab`), placed in the student's positions and vocabulary by `shared_support`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.batch import ROLE_ENV, ROLE_MODEL, RolloutBatch, left_padded, rollout_batch
from .cross_reading import CrossTokenizer, RowPlan
from .remote import Pending, RemoteTeacher
from .shared_support import logits_in_student_vocab, topk_in_student_vocab


@dataclass(frozen=True)
class TeacherView:
    """A batch's rows as the teacher reads them (`batch`) and their plans (student columns are relative to the
    student batch's first completion column, `first`)."""

    batch: RolloutBatch
    plans: list[RowPlan]
    first: int
    width: int  # the student batch's columns
    prompt_width: int  # the teacher batch's prompt columns (its completion window starts there)

    def chunk_ids(self) -> torch.Tensor:
        """[b, width] long: each student completion token's chunk in its row, -1 outside any chunk."""
        out = torch.full((len(self.plans), self.width), -1, dtype=torch.long)
        for b, plan in enumerate(self.plans):
            for col, c in plan.student_chunk.items():
                out[b, self.first + col] = c
        return out

    def to_student(self, teacher_lp_B_T: torch.Tensor) -> torch.Tensor:
        """Teacher token logprobs [b, T'] of `batch` -> [b, width]: each chunk's sum on its last student token."""
        out = torch.zeros((len(self.plans), self.width), dtype=torch.float32)
        lp = teacher_lp_B_T.float().cpu()
        t_first = self.prompt_width
        for b, plan in enumerate(self.plans):
            if not plan.chunks:
                continue
            chunk = torch.tensor(plan.teacher_chunk, dtype=torch.long)
            keep = chunk >= 0
            sums = torch.zeros(plan.chunks).index_add_(0, chunk[keep],
                                                       lp[b, t_first:t_first + len(chunk)][keep])
            last = torch.tensor([max(cols, default=-1) for cols in plan.members()[0]], dtype=torch.long)
            out[b, self.first + last] = sums
        return out


def teacher_view(cross: CrossTokenizer, batch: RolloutBatch) -> TeacherView:
    """The teacher's reading of every row of `batch` (a routed sub-batch, on any device)."""
    if len(batch.prompts) != batch.size:
        raise ValueError("a cross-tokenizer teacher needs each row's prompt text (RolloutBatch.prompts)")
    first = batch.first_completion_column
    ids = batch.input_ids_B_T[:, first:].tolist()
    roles = (batch.roles * batch.attention_mask_B_T)[:, first:].tolist()
    messages = batch.messages if len(batch.messages) == batch.size else [None] * batch.size
    domains = batch.domains if len(batch.domains) == batch.size else [""] * batch.size
    plans = [cross.plan(p, i, r, d, m) for p, i, r, d, m in zip(batch.prompts, ids, roles, domains, messages,
                                                                strict=True)]
    tok = cross.teacher_tok
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    prompt_ids, prompt_mask = left_padded([p.prompt for p in plans], pad)
    P = prompt_ids.shape[1]
    N = max(1, max((len(p.completion) for p in plans), default=0))
    B = len(plans)
    comp_ids, comp_roles = torch.full((B, N), pad, dtype=torch.long), torch.zeros((B, N), dtype=torch.long)
    for b, p in enumerate(plans):
        if p.completion:
            comp_ids[b, : len(p.completion)] = torch.tensor(p.completion)
            comp_roles[b, : len(p.roles)] = torch.tensor(p.roles)
    multi_turn = bool((comp_roles == ROLE_ENV).any())
    seen = rollout_batch(prompt_ids, prompt_mask, comp_ids, torch.zeros((B, N)), (comp_roles == ROLE_MODEL).float(),
                         prompts=list(batch.prompts), completions=list(batch.completions), domains=list(batch.domains),
                         references=list(batch.references),
                         completion_roles_B_N=comp_roles if multi_turn else None)
    if multi_turn:  # observations are attended to (context), only model tokens are scored
        seen.attention_mask_B_T[:, P:] = (comp_roles > 0).long()
    return TeacherView(seen, plans, first, batch.input_ids_B_T.shape[1], P)


def describe(views: list[TeacherView]) -> dict[str, Any]:
    """What a teacher's alignment covered (preflight.json): the share of the model turns' text bytes in aligned
    chunks, the chunk length distribution (student and teacher tokens per chunk), the student tokens in no chunk."""
    plans = [p for v in views for p in v.plans]
    text = sum(p.text_bytes for p in plans)
    tokens = sum(p.model_tokens for p in plans)
    lengths: dict[str, dict[int, int]] = {"student": {}, "teacher": {}}
    for p in plans:
        for side, members in zip(("student", "teacher"), p.members(), strict=True):
            for cols in members:
                lengths[side][len(cols)] = lengths[side].get(len(cols), 0) + 1
    chunks = sum(p.chunks for p in plans)
    return {
        "aligned_text_frac": sum(p.aligned_bytes for p in plans) / text if text else 1.0,
        "chunks": chunks,
        "student_tokens_per_chunk": {str(k): v for k, v in sorted(lengths["student"].items())},
        "teacher_tokens_per_chunk": {str(k): v for k, v in sorted(lengths["teacher"].items())},
        "template_tokens": sum(p.unpaired for p in plans),
        "unaligned_tokens": sum(p.unaligned for p in plans),
        "student_tokens": tokens,
    }


@dataclass
class _Reading:
    """One batch as the teacher reads it, and (once its logits came) its token logprobs on the student's columns."""

    key: tuple
    view: TeacherView
    sampled: torch.Tensor | None = None


def _batch_key(batch: RolloutBatch) -> tuple:
    """What a batch's reading depends on: its ids, masks, roles and prompt texts (a CPU batch)."""
    return (tuple(batch.input_ids_B_T.shape), *(t.numpy().tobytes() for t in (
        batch.input_ids_B_T, batch.attention_mask_B_T, batch.completion_mask_B_T, batch.roles)), tuple(batch.prompts))


def _token_logprobs(batch: RolloutBatch, logits_B_K_V: torch.Tensor) -> torch.Tensor:
    """log pi(y_t) [b, T] of `batch`'s completion tokens from the logits of its last K positions (position p
    predicts column T - K + p + 1), 0 off the completion: what `RemoteTeacher.sampled` answers."""
    T, K = batch.input_ids_B_T.shape[1], logits_B_K_V.shape[1]
    lp_B_W = torch.log_softmax(logits_B_K_V[:, :-1].float(), -1).gather(
        -1, batch.input_ids_B_T[:, T - K + 1:, None]).squeeze(-1)
    return torch.cat([lp_B_W.new_zeros(lp_B_W.shape[0], T - K + 1), lp_B_W], 1) * batch.completion_mask_B_T


@dataclass
class ForeignTeacher:
    """`remote.RemoteTeacher` over the student's batches for a teacher of another tokenizer: `inner` scores the
    teacher's own token batches (an in-process panel of it, an actor, a server).

    A step asks several things of one batch (the logits, the chunk layout, the chunks' logprobs), so the last
    batch's reading is kept, and the token logprobs its logits give answer `sampled` for that batch without a
    second teacher pass (`_Reading`): the same answers as reading and scoring again, up to float rounding."""

    inner: RemoteTeacher
    cross: CrossTokenizer
    _last: _Reading | None = field(default=None, init=False, repr=False, compare=False)

    def _read(self, batch: RolloutBatch) -> _Reading:
        cpu = batch.to("cpu")
        key = _batch_key(cpu)
        if self._last is None or self._last.key != key:
            self._last = _Reading(key, teacher_view(self.cross, cpu))
        return self._last

    def sampled(self, batch: RolloutBatch) -> Pending:
        reading = self._read(batch)
        if (known := reading.sampled) is not None:
            return lambda: known
        wait = self.inner.sampled(reading.view.batch)
        return lambda: reading.view.to_student(wait())  # type: ignore[arg-type]

    def chunk_ids(self, batch: RolloutBatch) -> torch.Tensor:
        return self._read(batch).view.chunk_ids()

    def alignment_report(self, batch: RolloutBatch) -> dict[str, Any]:
        """`describe`, and what the distribution-level objectives would have: the single-token chunks (their
        positions) and the tokens both vocabularies share."""
        view = self._read(batch).view
        return {**describe([view]), "single_token_chunks": sum(len(p.single_token_chunks()) for p in view.plans),
                "shared_tokens": int(self.cross.vocab.student_ids.numel())}

    def topk(self, batch: RolloutBatch, k: int, window: int) -> Pending:
        """The teacher's top-k of the tokens the student has, at the student's single-token chunks, in student ids
        (`shared_support`), and each chunk's teacher logprob on its last student token (as `sampled`)."""
        view = self._read(batch).view
        wait = self.inner.topk(view.batch, k, view.batch.input_ids_B_T.shape[1] - view.prompt_width)

        def result():
            top_lp, top_ids, sampled = wait()  # type: ignore[misc]
            return (*topk_in_student_vocab(view, self.cross.vocab, top_lp, top_ids, window), view.to_student(sampled))

        return result

    def logits(self, batch: RolloutBatch, keep: int) -> Pending:
        """The teacher's logits of the shared tokens at the student's single-token chunks, in the student's
        vocabulary, -inf elsewhere (`shared_support`): [b, keep, V_s]. Its token logprobs are kept for `sampled`."""
        reading = self._read(batch)
        view = reading.view
        T_t = view.batch.input_ids_B_T.shape[1]
        wait = self.inner.logits(view.batch, min(T_t, T_t - view.prompt_width + 1))

        def result():
            logits = wait()
            reading.sampled = view.to_student(_token_logprobs(view.batch, logits))  # type: ignore[arg-type]
            return logits_in_student_vocab(view, self.cross.vocab, logits, keep)  # type: ignore[arg-type]

        return result


@dataclass
class PanelTeacher:
    """An in-process `TeacherPanel` as a `remote.RemoteTeacher` of one teacher: what a `ForeignTeacher` in this
    process scores its token batches with."""

    panel: Any  # teachers.panel.TeacherPanel
    name: str

    def sampled(self, batch: RolloutBatch) -> Pending:
        out = self.panel.sampled_logprobs(batch, [self.name] * batch.size).cpu()
        return lambda: out

    def topk(self, batch: RolloutBatch, k: int, window: int) -> Pending:
        out = tuple(t.cpu() for t in self.panel.topk(batch, [self.name] * batch.size, k, window))
        return lambda: out

    def logits(self, batch: RolloutBatch, keep: int) -> Pending:
        out = self.panel.logit_blocks(batch, [self.name] * batch.size, keep)(0, keep).cpu()
        return lambda: out
