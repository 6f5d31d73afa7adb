"""Reverse and forward KL over the full vocabulary as one autograd function each, for blocks of positions.

Why: at a real vocabulary (V = 151,936) a full-vocabulary objective's cost is passes over [rows, block, V], not
arithmetic. Composed from log_softmax, exp, subtract, multiply and sum (`objectives.reverse_kl_tokens`), the
reverse KL makes about 16 passes forward and 10 backward, and a checkpointed block runs its forward twice. Here
the forward needs the two log-sum-exps, one exponential, the log-ratio (two passes) and one dot product:

    r_v = (s_v - t_v) - (lse_s - lse_t) = log p_v - log q_v        p = softmax(s), q = softmax(t)
    KL(p || q) = sum_v p_v r_v,   KL(q || p) = sum_v q_v (-r_v)

and the gradient wrt the student's logits s is written in place over saved buffers:

    d KL(p || q) / d s_v = p_v (r_v - KL(p || q))
    d KL(q || p) / d s_v = p_v - q_v

Both also return the teacher's log-sum-exp, so the teacher's log-probability of the sampled token costs a gather.
Used only with several blocks (`objective_table.full_distribution_terms`): one block stays op for op the composed
computation, so recorded numbers do not move; several blocks agree with it to float rounding
(`tests/test_fused_kl.py`, float64). A -inf logit (a masked vocabulary) takes the guarded path: 0 log 0 = 0.
"""

from __future__ import annotations

import torch

from ..core.logprobs import upcast


def kl_parts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """KL(softmax(a) || softmax(b)) over the last dim, with what its gradients need: (KL, softmax(a), the
    log-ratio log softmax(a) - log softmax(b), lse_a, lse_b), the log-sum-exps kept as [..., 1]. The log-ratio
    is (a - b) - (lse_a - lse_b), two passes; a -inf logit makes it +-inf or nan where softmax(a) is 0, and such
    terms count 0 (0 log 0)."""
    lse_a = torch.logsumexp(a, -1, keepdim=True)
    lse_b = torch.logsumexp(b, -1, keepdim=True)
    w = torch.sub(a, lse_a).exp_()
    r = torch.sub(a, b).sub_(lse_a - lse_b)
    kl = torch.linalg.vecdot(w, r)
    if not bool(torch.isfinite(kl).all()):
        r = torch.where(w > 0, r, 0.0)
        kl = torch.linalg.vecdot(w, r)
    return kl, w, r, lse_a, lse_b


class _ReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_b_N_V: torch.Tensor, t_b_N_V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kl, p, r, _, lse_t = kl_parts(s_b_N_V, t_b_N_V)
        ctx.save_for_backward(p, r, kl)
        return kl, lse_t.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor, _grad_lse: torch.Tensor) -> tuple[torch.Tensor, None]:
        p, r, kl = ctx.saved_tensors
        return r.sub_(kl.unsqueeze(-1)).mul_(p).mul_(grad_kl.unsqueeze(-1)), None


class _ForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_b_N_V: torch.Tensor, t_b_N_V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kl, q, _, lse_t, lse_s = kl_parts(t_b_N_V, s_b_N_V)
        ctx.save_for_backward(s_b_N_V, lse_s, q)
        return kl, lse_t.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor, _grad_lse: torch.Tensor) -> tuple[torch.Tensor, None]:
        s, lse_s, q = ctx.saved_tensors
        return torch.sub(s, lse_s).exp_().sub_(q).mul_(grad_kl.unsqueeze(-1)), None


def _pair(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in float32 at least, in one dtype (a float64 student beside a float32 teacher: float64)."""
    dtype = torch.promote_types(upcast(s).dtype, upcast(t).dtype)
    return s.to(dtype), t.detach().to(dtype)


def reverse_kl_and_teacher_lse(student_b_N_V: torch.Tensor,
                               teacher_b_N_V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(p || q) at each position, the teacher's log-sum-exp), [b, N] each; grad wrt the student only."""
    return _ReverseKL.apply(*_pair(student_b_N_V, teacher_b_N_V))


def forward_kl_and_teacher_lse(student_b_N_V: torch.Tensor,
                               teacher_b_N_V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(q || p) at each position, the teacher's log-sum-exp), [b, N] each; grad wrt the student only."""
    return _ForwardKL.apply(*_pair(student_b_N_V, teacher_b_N_V))
