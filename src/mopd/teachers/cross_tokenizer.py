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

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from ..core.batch import ROLE_ENV, ROLE_MODEL, RolloutBatch, rollout_batch
from ..core.token_chunks import align_tokens
from ..envs.episode import observation_ids, prompt_ids
from ..models.prompting import PromptFormat
from ..models.shared_vocab import SharedVocab, shared_vocab
from ..models.token_bytes import token_bytes
from .remote import Pending, RemoteTeacher
from .shared_support import logits_in_student_vocab, topk_in_student_vocab


@dataclass
class RowPlan:
    """One row as the teacher reads it, and how its tokens map onto the student's."""

    prompt: list[int]  # the teacher's rendering of the prompt
    completion: list[int] = field(default_factory=list)  # the teacher's tokens of the completion window
    roles: list[int] = field(default_factory=list)  # ROLE_MODEL / ROLE_ENV of each
    teacher_chunk: list[int] = field(default_factory=list)  # chunk of each teacher completion token (-1: none)
    student_chunk: dict[int, int] = field(default_factory=dict)  # student column -> chunk
    chunks: int = 0
    model_tokens: int = 0  # student model tokens
    unpaired: int = 0  # student model tokens that cover no text and have no counterpart (template tokens)
    unaligned: int = 0  # student model tokens of turns whose text could not be aligned
    text_bytes: int = 0  # bytes of the model turns' text
    aligned_bytes: int = 0  # ... in aligned chunks


    def single_token_chunks(self) -> list[tuple[int, int]]:
        """(student column, teacher completion index) of each chunk of one token on each side: where the two
        models' next-token distributions follow the same text and predict the same string (the distribution-level
        objectives' positions, `teachers.shared_support`)."""
        students: dict[int, list[int]] = {}
        for col, c in self.student_chunk.items():
            students.setdefault(c, []).append(col)
        teachers: dict[int, list[int]] = {}
        for i, c in enumerate(self.teacher_chunk):
            if c >= 0:
                teachers.setdefault(c, []).append(i)
        return sorted((cols[0], teachers[c][0]) for c, cols in students.items()
                      if len(cols) == 1 and len(teachers.get(c, ())) == 1)


def _segments(roles: list[int]) -> list[tuple[int, int, int]]:
    """(role, start, stop) of each run of model or environment columns (padding ends none and is skipped)."""
    out: list[tuple[int, int, int]] = []
    for col, role in enumerate(roles):
        if role not in (ROLE_MODEL, ROLE_ENV):
            continue
        if out and out[-1][0] == role and out[-1][2] == col:
            out[-1] = (role, out[-1][1], col + 1)
        else:
            out.append((role, col, col + 1))
    return out


@dataclass(frozen=True)
class CrossTokenizer:
    """The student's tokenizer and the teacher's tokenizer and prompt format: how a row is re-read."""

    student_tok: Any
    teacher_tok: Any
    teacher_format: PromptFormat
    student_width: int | None = None  # the student model's logit columns, when more than its tokenizer's tokens
    # each tool-use domain's tools (domain -> name -> Tool): a chat template shows their schemas, so the teacher's
    # rendering of such a row's prompt and observations needs them (`envs.episode.prompt_ids`, `observation_ids`)
    tools: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @cached_property
    def vocab(self) -> SharedVocab:
        """The tokens both vocabularies have as strings (built once per pair; the distribution-level objectives)."""
        return shared_vocab(self.student_tok, self.teacher_tok, self.student_width)

    def _teacher_tokens(self, text: str) -> tuple[list[int], list[bytes] | None]:
        """The teacher's tokens of `text` and their bytes. Text that spells one of the teacher's special tokens
        ("<eos>" written piece by piece by a student of another vocabulary) is read as text
        (`split_special_tokens`): the teacher's end token would score the end of the turn, not the string."""
        ids = self.teacher_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []
        return ids, token_bytes(self.teacher_tok.convert_ids_to_tokens(ids), text)

    def plan(self, prompt: str, ids: list[int], roles: list[int], domain: str = "",
             messages: list[dict] | None = None) -> RowPlan:
        """`ids` and `roles`: the student's completion window of one row (ROLE_PROMPT on its padding); `messages`:
        its conversation, for a tool-use row (`RolloutBatch.messages`), whose prompt and observations the teacher
        renders as its own chat template renders them (with the domain's tools); without it an observation is
        read as text."""
        tools = self.tools.get(domain)
        plan = RowPlan(prompt=prompt_ids(self.teacher_tok, self.teacher_format, prompt, tools) if tools is not None
                       else self.teacher_format.token_ids(self.teacher_tok, prompt))
        observation = 0
        for role, start, stop in _segments(roles):
            if role == ROLE_ENV:  # context, in the teacher's tokens
                t_ids = self._observation(messages, observation, tools)
                if t_ids is None:  # its text, as the student wrote it out
                    t_ids, _ = self._teacher_tokens(self.student_tok.decode(ids[start:stop], skip_special_tokens=True))
                observation += 1
                plan.completion += t_ids
                plan.roles += [ROLE_ENV] * len(t_ids)
                plan.teacher_chunk += [-1] * len(t_ids)
                continue
            plan.model_tokens += stop - start
            text_cols: list[int] = []
            for col in range(start, stop):
                if ids[col] not in self._special:
                    text_cols.append(col)
                    continue
                self._add_text(plan, ids, text_cols)
                text_cols = []
                self._add_special(plan, col, ids[col])
            self._add_text(plan, ids, text_cols)
        return plan

    def _observation(self, messages: list[dict] | None, k: int, tools) -> list[int] | None:
        """The teacher's rendering of a row's k-th observation (the messages after its k-th assistant turn), or None
        without the messages or when its template cannot render one after an assistant turn."""
        if not messages:
            return None
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if k >= len(turns):
            return None
        upto = turns[k + 1] if k + 1 < len(turns) else len(messages)
        try:
            return observation_ids(self.teacher_tok, self.teacher_format, messages[:upto], tools)
        except ValueError:
            return None

    @cached_property
    def _special(self) -> set[int]:
        return set(self.student_tok.all_special_ids)

    def _add_special(self, plan: RowPlan, col: int, token: int) -> None:
        """A student special token: its own chunk with the teacher's token of the same string (the student's end
        token with the teacher's, whatever their strings), or in no chunk when the teacher has none."""
        if token == self.student_tok.eos_token_id and self.teacher_tok.eos_token_id is not None:
            mate = self.teacher_tok.eos_token_id
        else:
            mate = self._teacher_special.get(self.student_tok.convert_ids_to_tokens(token))
        if mate is None:
            plan.unpaired += 1
            return
        plan.completion.append(mate)
        plan.roles.append(ROLE_MODEL)
        plan.teacher_chunk.append(plan.chunks)
        plan.student_chunk[col] = plan.chunks
        plan.chunks += 1

    @cached_property
    def _teacher_special(self) -> dict[str, int]:
        tok = self.teacher_tok
        return dict(zip(tok.all_special_tokens, tok.all_special_ids, strict=True))

    def _add_text(self, plan: RowPlan, ids: list[int], text_cols: list[int]) -> None:
        """A run of the student's text tokens: the teacher's tokens of its text, aligned by bytes."""
        if not text_cols:
            return
        text_ids = [ids[c] for c in text_cols]
        text = self.student_tok.decode(text_ids, clean_up_tokenization_spaces=False)
        s_bytes = token_bytes(self.student_tok.convert_ids_to_tokens(text_ids), text)
        t_ids, t_bytes = self._teacher_tokens(text)
        alignment = (align_tokens([len(b) for b in s_bytes], [len(b) for b in t_bytes])
                     if s_bytes is not None and t_bytes is not None else None)
        plan.text_bytes += len(text.encode())
        plan.completion += t_ids
        plan.roles += [ROLE_MODEL] * len(t_ids)
        if alignment is None:
            plan.unaligned += len(text_cols)
            plan.teacher_chunk += [-1] * len(t_ids)
            return
        plan.teacher_chunk += [c + plan.chunks if c >= 0 else -1 for c in alignment.teacher]
        for col, c in zip(text_cols, alignment.student, strict=True):
            if c >= 0:
                plan.student_chunk[col] = c + plan.chunks
        plan.chunks += alignment.chunks
        plan.aligned_bytes += len(text.encode())


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
            last = torch.full((plan.chunks,), -1, dtype=torch.long)
            for col, c in plan.student_chunk.items():
                last[c] = max(int(last[c]), col)
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
    P = max((len(p.prompt) for p in plans), default=0)
    N = max(1, max((len(p.completion) for p in plans), default=0))
    B = len(plans)
    prompt_ids, prompt_mask = torch.full((B, P), pad, dtype=torch.long), torch.zeros((B, P), dtype=torch.long)
    comp_ids, comp_roles = torch.full((B, N), pad, dtype=torch.long), torch.zeros((B, N), dtype=torch.long)
    for b, p in enumerate(plans):
        if p.prompt:
            prompt_ids[b, P - len(p.prompt):], prompt_mask[b, P - len(p.prompt):] = torch.tensor(p.prompt), 1
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
        s_len = [0] * p.chunks
        for c in p.student_chunk.values():
            s_len[c] += 1
        t_len = [0] * p.chunks
        for c in p.teacher_chunk:
            if c >= 0:
                t_len[c] += 1
        for side, ls in (("student", s_len), ("teacher", t_len)):
            for n in ls:
                lengths[side][n] = lengths[side].get(n, 0) + 1
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
