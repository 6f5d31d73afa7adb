"""A teacher of another tokenizer's next-token distributions, moved onto the student's positions and vocabulary:
what `cross_tokenizer.ForeignTeacher` answers for the distribution-level objectives (docs/CROSS_TOKENIZER.md).

Where: only at the student positions whose token is a single-token chunk (`RowPlan.single_token_chunks`: one
student token and one teacher token covering the same bytes after the same text). There both models predict the
next token after the same text, and the token each predicts is the same string, so their distributions over the
strings both vocabularies have (`models.shared_vocab`) compare. Every other position of the row gets no
distribution (a row of -inf): the learner gives it the chunk's sampled-token term instead.

What: the teacher's values at its position, each shared token's at its student id, -inf at the student ids the
teacher lacks. For `logits`, the teacher's logits as they are (not log-probabilities: the learner renormalises over
the shared support anyway, and a teacher of the very same tokenizer then gives the same-tokenizer numbers bit for
bit). For `topk`, the teacher's top-k log-probabilities (over its whole vocabulary) of the tokens the student has,
in order; a position where fewer than k are shared gets -inf entries (no outcome) after them, naming the first
one's id again, and a position where none is shared has no term.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..models.shared_vocab import SharedVocab

if TYPE_CHECKING:  # cross_tokenizer's ForeignTeacher calls this module
    from .cross_tokenizer import TeacherView


def term_positions(view: TeacherView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, student column, teacher column) of every single-token chunk of the view's rows, in the columns of the
    student batch and of the teacher batch (`view.batch`)."""
    found = [(b, view.first + col, view.prompt_width + i)
             for b, plan in enumerate(view.plans) for col, i in plan.single_token_chunks()]
    out = torch.tensor(found, dtype=torch.long).reshape(-1, 3)
    return out[:, 0], out[:, 1], out[:, 2]


def logits_in_student_vocab(view: TeacherView, vocab: SharedVocab, teacher_B_K_V: torch.Tensor,
                            keep: int) -> torch.Tensor:
    """The teacher's logits of `view.batch` at its last K' positions ([b, K', V_t]; position p predicts teacher
    column T' - K' + p + 1) -> the student's last `keep` positions ([b, keep, V_s]; position j predicts student
    column T - keep + j + 1), -inf outside the single-token chunks and the shared tokens."""
    T, T_t, K_t = view.width, view.batch.input_ids_B_T.shape[1], teacher_B_K_V.shape[1]
    rows, s_col, t_col = term_positions(view)
    j, p = s_col - (T - keep + 1), t_col - (T_t - K_t + 1)
    ok = (j >= 0) & (j < keep) & (p >= 0) & (p < K_t)
    out = teacher_B_K_V.new_full((len(view.plans), keep, vocab.student_size), -torch.inf)
    out[rows[ok], j[ok]] = vocab.to_student(teacher_B_K_V[rows[ok], p[ok]])
    return out


def topk_in_student_vocab(view: TeacherView, vocab: SharedVocab, top_lp_B_W_k: torch.Tensor,
                          top_ids_B_W_k: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k over the last W' tokens of `view.batch` ([b, W', k]; column c concerns teacher column
    T' - W' + c) -> over the student's last `window` tokens ([b, window, k] each), in student ids."""
    T, T_t, W_t = view.width, view.batch.input_ids_B_T.shape[1], top_lp_B_W_k.shape[1]
    rows, s_col, t_col = term_positions(view)
    j, c = s_col - (T - window), t_col - (T_t - W_t)
    ok = (j >= 0) & (j < window) & (c >= 0) & (c < W_t)
    rows, j, c = rows[ok], j[ok], c[ok]
    k = top_lp_B_W_k.shape[-1]
    student_of = vocab.student_of_teacher
    ids_n_k = top_ids_B_W_k[rows, c].long()
    inside = ids_n_k < student_of.numel()  # a teacher id past its tokenizer (padded embeddings) has no string
    ids_n_k = torch.where(inside, student_of[ids_n_k.clamp(max=student_of.numel() - 1)], -1)
    order = torch.argsort((ids_n_k < 0).to(torch.int8), dim=-1, stable=True)  # shared first, in the teacher's order
    ids_n_k = ids_n_k.gather(-1, order)
    lp_n_k = torch.where(ids_n_k >= 0, top_lp_B_W_k[rows, c].gather(-1, order), -torch.inf)
    ids_n_k = torch.where(ids_n_k >= 0, ids_n_k, ids_n_k[:, :1].clamp(min=0))
    lp = top_lp_B_W_k.new_full((len(view.plans), window, k), -torch.inf)
    ids = torch.zeros((len(view.plans), window, k), dtype=torch.long)
    lp[rows, j], ids[rows, j] = lp_n_k, ids_n_k
    return lp, ids
