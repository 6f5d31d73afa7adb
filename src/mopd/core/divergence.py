"""KL divergence between next-token distributions given as logits, position by position.

Two layers measure it and must agree to the bit: the learner's full-distribution losses
(`learner.objectives`) and the teachers' preflight (`teachers.preflight`), which reports the initial reverse KL a
MOPD stage will start from. It lives in the bottom layer so that the preflight does not depend on the learner.
"""

from __future__ import annotations

import torch

from .logprobs import upcast


def log_softmax_pair(
    student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) over the vocabulary, in at least float32; the teacher's side carries no gradient (it is the
    target, never trained through a distillation loss)."""
    logp_B_T_V = torch.log_softmax(upcast(student_logits_B_T_V), dim=-1)
    logq_B_T_V = torch.log_softmax(upcast(teacher_logits_B_T_V.detach()), dim=-1)
    return logp_B_T_V, logq_B_T_V


def categorical_kl(loga_B_T_V: torch.Tensor, logb_B_T_V: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum over the last dim of a_v (log a_v - log b_v), with 0 log 0 := 0 (e.g. -inf logits)."""
    a_B_T_V = loga_B_T_V.exp()
    diff_B_T_V = loga_B_T_V - logb_B_T_V
    # With -inf log-probabilities (masked vocabulary), select the difference first so a (-inf) - (-inf) = nan
    # never meets the multiply, even in backward. Without any, the select changes no value or gradient (where
    # a = 0 the term and its gradients are 0 either way) and at a real vocabulary it costs passes over [B, T, V].
    if diff_B_T_V.numel() and not bool(torch.isfinite(diff_B_T_V.detach()).all()):
        diff_B_T_V = torch.where(a_B_T_V > 0, diff_B_T_V, 0.0)
    return (a_B_T_V * diff_B_T_V).sum(-1)
