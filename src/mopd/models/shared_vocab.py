"""The tokens two vocabularies share as strings: where a teacher of another tokenizer and the student can compare
next-token distributions at all.

Why bytes: two tokenizers spell the same string differently (`a`, `Ġa`, `▁a`), so ids and token strings do not
compare; the bytes a token stands for do (`models.token_bytes`: literal, byte-level and metaspace conventions). A
tokenizer's convention is read once from a probe text it must reproduce, then every regular token's string is
turned into bytes with it. Two regular tokens are shared when their bytes are equal. Special tokens stand for no
text: they are shared when their strings are equal, and the student's end token always with the teacher's, whatever
their strings (both say "the turn ends here", as `teachers.cross_tokenizer` pairs them in the rows). A tokenizer
whose convention no probe reveals shares its special tokens only (never a guess).

The map is one-to-one: where several ids of a side stand for the same bytes (an added token that repeats a regular
one), the lowest id is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from .token_bytes import CONVENTIONS

# texts a tokenizer must reproduce exactly to reveal its convention (a space and a digit tell literal, byte-level
# and metaspace apart); several, so that a small alphabet that lacks some character still gets one
PROBES = ("ab 12", "a 1", "hello world 12", "a")


def token_convention(tok: Any):
    """The `models.token_bytes` convention of `tok`'s token strings (a function str -> bytes), or None."""
    for probe in PROBES:
        ids = tok(probe, add_special_tokens=False)["input_ids"]
        if set(ids) & set(getattr(tok, "all_special_ids", [])):
            continue  # an unknown character: this probe cannot tell
        tokens = tok.convert_ids_to_tokens(ids)
        for convention in CONVENTIONS:
            try:
                joined = b"".join(convention(t) for t in tokens)
            except KeyError:
                continue
            if joined == probe.encode() or (joined[:1] == b" " and joined[1:] == probe.encode()):  # dummy prefix
                return convention
    return None


def vocabulary_bytes(tok: Any, size: int) -> dict[bytes, int]:
    """bytes -> the lowest id of `tok`'s regular tokens (ids below `size`) that stands for them."""
    convention = token_convention(tok)
    if convention is None:
        return {}
    special = set(getattr(tok, "all_special_ids", []))
    out: dict[bytes, int] = {}
    for token, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        if i in special or i >= size:
            continue
        try:
            out.setdefault(convention(token), i)
        except KeyError:  # not a string of this convention (an added token): stands for no known bytes
            continue
    return out


@dataclass(frozen=True)
class SharedVocab:
    """Pairs of (student id, teacher id) that stand for the same string; `student_size` / `teacher_size` are the
    widths of each model's logits (each tokenizer's length when not given)."""

    student_ids: torch.Tensor  # [n] long
    teacher_ids: torch.Tensor  # [n] long
    student_size: int
    teacher_size: int

    @cached_property
    def student_of_teacher(self) -> torch.Tensor:
        """[teacher_size] long: the student id of each teacher id, -1 where the student has no such token."""
        out = torch.full((self.teacher_size,), -1, dtype=torch.long)
        out[self.teacher_ids] = self.student_ids
        return out

    def to_student(self, teacher_V: torch.Tensor, fill: float = -torch.inf) -> torch.Tensor:
        """Values over the teacher's vocabulary [..., teacher_size] -> over the student's [..., student_size]: each
        shared token's value at its student id, `fill` at the student ids the teacher lacks."""
        out = teacher_V.new_full((*teacher_V.shape[:-1], self.student_size), fill)
        out[..., self.student_ids] = teacher_V[..., self.teacher_ids]
        return out


def shared_vocab(student_tok: Any, teacher_tok: Any, student_size: int | None = None,
                 teacher_size: int | None = None) -> SharedVocab:
    """The shared tokens of two tokenizers (`student_size` / `teacher_size`: the models' logit widths, when known;
    an id at or past its model's width is no token of it)."""
    s_size = student_size or len(student_tok)
    t_size = teacher_size or len(teacher_tok)
    teacher_of = vocabulary_bytes(teacher_tok, t_size)
    pairs = {s: teacher_of[b] for b, s in vocabulary_bytes(student_tok, s_size).items() if b in teacher_of}
    teacher_special = dict(zip(teacher_tok.all_special_tokens, teacher_tok.all_special_ids, strict=True))
    for token, s in zip(student_tok.all_special_tokens, student_tok.all_special_ids, strict=True):
        if token in teacher_special:
            pairs[s] = teacher_special[token]
    if student_tok.eos_token_id is not None and teacher_tok.eos_token_id is not None:
        pairs[student_tok.eos_token_id] = teacher_tok.eos_token_id
    taken: set[int] = set()
    kept = []
    for s, t in sorted(pairs.items()):
        if t not in taken and s < s_size and t < t_size:  # one-to-one: a teacher id to the lowest student id
            taken.add(t)
            kept.append((s, t))
    ids = torch.tensor(kept, dtype=torch.long).reshape(-1, 2)
    return SharedVocab(ids[:, 0].contiguous(), ids[:, 1].contiguous(), s_size, t_size)
