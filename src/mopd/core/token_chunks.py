"""Aligned chunks of two tokenizations of one text: the unit a teacher of another tokenizer is scored in.

Why chunks: a student and a teacher of different vocabularies cut the same completion into different tokens, so
there is no teacher logprob of a student token. But wherever a run of student tokens and a run of teacher tokens
cover exactly the same bytes, both models assign a probability to the same string given the same text before it:
log pi_S(chunk) and log pi_T(chunk) are comparable, and their difference is the chunk's reverse-KL estimate.

The chunks are cut at every byte offset where both tokenizations have a token boundary. Offsets are UTF-8 bytes,
not characters: a byte-level BPE may end a token inside a multi-byte character, and a boundary there is a
boundary of both only if the other side cuts there too. Tokens that cover no byte (special and template tokens
that exist for one side only) belong to no chunk. Between two common boundaries every token of either side that
covers a byte belongs to exactly one chunk, so the chunks tile the text and no byte is counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Alignment:
    """Chunk index of each token of each side (-1: a token that covers no byte, in no chunk)."""

    student: list[int]
    teacher: list[int]
    chunks: int


def align_tokens(student_bytes: list[int], teacher_bytes: list[int]) -> Alignment | None:
    """Chunks of two tokenizations given each token's byte length, in order; None when the two do not cover the
    same number of bytes (they are not tokenizations of one text).

    Walks both sides once: a chunk takes the next token of each side, then the next token of whichever side ends
    earlier, until both end at the same offset."""
    if sum(student_bytes) != sum(teacher_bytes) or min(student_bytes + teacher_bytes, default=0) < 0:
        return None
    s_chunk = [-1] * len(student_bytes)
    t_chunk = [-1] * len(teacher_bytes)
    i = j = 0
    s_end = t_end = 0
    chunk = 0

    def next_token(lengths: list[int], k: int) -> int:
        while k < len(lengths) and lengths[k] == 0:
            k += 1  # covers no byte: in no chunk
        return k

    while True:
        i, j = next_token(student_bytes, i), next_token(teacher_bytes, j)
        if i == len(student_bytes) or j == len(teacher_bytes):
            break
        s_chunk[i], s_end, i = chunk, s_end + student_bytes[i], i + 1
        t_chunk[j], t_end, j = chunk, t_end + teacher_bytes[j], j + 1
        while s_end != t_end:
            if s_end < t_end:
                i = next_token(student_bytes, i)
                s_chunk[i], s_end, i = chunk, s_end + student_bytes[i], i + 1
            else:
                j = next_token(teacher_bytes, j)
                t_chunk[j], t_end, j = chunk, t_end + teacher_bytes[j], j + 1
        chunk += 1
    return Alignment(s_chunk, t_chunk, chunk)
