"""How a row of the student's is read by a teacher of another tokenizer: the teacher's tokens of it and the
aligned chunks that map them onto the student's (`CrossTokenizer.plan` -> `RowPlan`).

The prompt is rendered with the teacher's prompt format (a tool-use row's with the domain's tools), each model
turn's text re-tokenized by the teacher's tokenizer and cut into chunks with the student's tokens
(`core.token_chunks`), each observation rendered from the row's messages as the teacher's chat template renders
tool messages. `teachers.cross_tokenizer` builds the teacher's batch from the plans and maps its scores back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..core.batch import ROLE_ENV, ROLE_MODEL
from ..core.token_chunks import align_tokens
from ..envs.episode import observation_ids, prompt_ids
from ..models.prompting import PromptFormat
from ..models.shared_vocab import SharedVocab, shared_vocab
from ..models.token_bytes import token_bytes


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


    def members(self) -> tuple[list[list[int]], list[list[int]]]:
        """Each chunk's student columns and teacher completion indices, in order (one pass over the plan)."""
        students: list[list[int]] = [[] for _ in range(self.chunks)]
        for col, c in sorted(self.student_chunk.items()):
            students[c].append(col)
        teachers: list[list[int]] = [[] for _ in range(self.chunks)]
        for i, c in enumerate(self.teacher_chunk):
            if c >= 0:
                teachers[c].append(i)
        return students, teachers

    def single_token_chunks(self) -> list[tuple[int, int]]:
        """(student column, teacher completion index) of each chunk of one token on each side: where the two
        models' next-token distributions follow the same text and predict the same string (the distribution-level
        objectives' positions, `teachers.shared_support`)."""
        return sorted((cols[0], idx[0]) for cols, idx in zip(*self.members(), strict=True)
                      if len(cols) == 1 and len(idx) == 1)


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
