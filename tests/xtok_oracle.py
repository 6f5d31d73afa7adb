"""What the alignment of a batch must report, derived from the text alone (not from `teachers.cross_tokenizer`), for
tokenizer pairs of which one side is characters: the tests of whole runs (tests/test_cross_tokenizer_run.py,
tests/test_cross_tokenizer_http.py) check the preflight's `cross_tokenizer` block and the `xtok/aligned_token_frac`
metric against it.

With characters on one side every token boundary of the other side is a boundary of both, so the chunks of a run of
text are the other side's tokens: (1 student token, n characters) with a character teacher, (n characters, 1
token) with a character student. A run of text (between special tokens) aligns when the teacher's vocabulary can
write each of its characters, else none of it does. A special token aligns with the teacher's end token (the
student's end token) or its token of the same string.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mopd.core.batch import ROLE_MODEL, RolloutBatch


@dataclass
class Coverage:
    text_chars: int = 0
    aligned_chars: int = 0
    model_tokens: int = 0
    chunked_tokens: int = 0  # student model tokens in a chunk
    unaligned: int = 0
    template: int = 0
    student_per_chunk: Counter = field(default_factory=Counter)
    teacher_per_chunk: Counter = field(default_factory=Counter)
    single: int = 0  # chunks of one token on each side

    def describe(self) -> dict:
        """`cross_tokenizer.describe`'s keys."""
        return {
            "aligned_text_frac": self.aligned_chars / self.text_chars if self.text_chars else 1.0,
            "chunks": sum(self.student_per_chunk.values()),
            "student_tokens_per_chunk": {str(k): v for k, v in sorted(self.student_per_chunk.items())},
            "teacher_tokens_per_chunk": {str(k): v for k, v in sorted(self.teacher_per_chunk.items())},
            "template_tokens": self.template,
            "unaligned_tokens": self.unaligned,
            "student_tokens": self.model_tokens,
        }


def expected_report(cov: Coverage, student_tok, teacher_tok) -> dict:
    """`ForeignTeacher.alignment_report`: `describe`'s keys, the single-token chunks and the size of the shared
    vocabulary (student ids whose token is a teacher token of the same text; special tokens of the same string, and
    the student's end token with the teacher's)."""
    teacher_texts = {teacher_tok.decode([i]) for i in teacher_tok.get_vocab().values()
                     if i not in teacher_tok.all_special_ids}
    shared = sum(teacher_tok.eos_token_id is not None if i == student_tok.eos_token_id
                 else student_tok.convert_ids_to_tokens(i) in teacher_tok.all_special_tokens
                 if i in student_tok.all_special_ids else student_tok.decode([i]) in teacher_texts
                 for i in student_tok.get_vocab().values())
    return {**cov.describe(), "single_token_chunks": cov.single, "shared_tokens": shared}


def writable(tok) -> set[str]:
    """The characters a tokenizer writes as themselves (one token each, or inside merged tokens)."""
    out = set()
    for i in tok.get_vocab().values():
        if i not in tok.all_special_ids:
            out |= set(tok.decode([i]))
    return out


def row_coverage(cov: Coverage, student_tok, teacher_tok, ids: list[int], roles: list[int]) -> None:
    """Add one row's completion window (`ids`, `roles`: ROLE_MODEL on the model's tokens) to `cov`."""
    can_write = writable(teacher_tok)
    student_special, teacher_special = set(student_tok.all_special_ids), set(teacher_tok.all_special_tokens)
    run: list[int] = []

    def close_run() -> None:
        if not run:
            return
        text = student_tok.decode(run, clean_up_tokenization_spaces=False)
        cov.text_chars += len(text)
        if not set(text) <= can_write:
            cov.unaligned += len(run)
        else:
            cov.aligned_chars += len(text)
            cov.chunked_tokens += len(run)
            s_pieces = [student_tok.decode([i]) for i in run]
            t_pieces = [teacher_tok.decode([i]) for i in teacher_tok(text, add_special_tokens=False)["input_ids"]]
            assert min(map(len, s_pieces)) == 1 or min(map(len, t_pieces)) == 1, "one side must be characters"
            coarse, by_student = (s_pieces, True) if len(s_pieces) <= len(t_pieces) else (t_pieces, False)
            for piece in coarse:
                cov.student_per_chunk[1 if by_student else len(piece)] += 1
                cov.teacher_per_chunk[len(piece) if by_student else 1] += 1
                cov.single += len(piece) == 1
        run.clear()

    for i, role in zip(ids, roles, strict=True):
        if role != ROLE_MODEL:
            continue
        cov.model_tokens += 1
        if i not in student_special:
            run.append(i)
            continue
        close_run()
        if i == student_tok.eos_token_id or student_tok.convert_ids_to_tokens(i) in teacher_special:
            cov.chunked_tokens += 1
            cov.student_per_chunk[1] += 1
            cov.teacher_per_chunk[1] += 1
            cov.single += 1
        else:
            cov.template += 1
    close_run()


def batch_coverage(batch: RolloutBatch, student_tok, teacher_of_row: list) -> Coverage:
    """The coverage of every row of `batch`; `teacher_of_row[b]`: the teacher tokenizer of row b (None: a teacher of
    the student's own tokenizer, whose every model token is a chunk of its own)."""
    cov = Coverage()
    first = batch.first_completion_column
    ids = batch.input_ids_B_T[:, first:].tolist()
    roles = (batch.roles * batch.attention_mask_B_T)[:, first:].tolist()
    for row_ids, row_roles, teacher_tok in zip(ids, roles, teacher_of_row, strict=True):
        if teacher_tok is None:
            n = row_roles.count(ROLE_MODEL)
            cov.model_tokens += n
            cov.chunked_tokens += n
        else:
            row_coverage(cov, student_tok, teacher_tok, row_ids, row_roles)
    return cov
