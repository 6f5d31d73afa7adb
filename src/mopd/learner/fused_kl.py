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


def log_ratio(a: torch.Tensor, lse_a: torch.Tensor, b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """log softmax(a) - log softmax(b), elementwise, in two passes: (a - b) - (lse_a - lse_b)."""
    return torch.sub(a, b).sub_(lse_a - lse_b)


def weighted_sum(w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_v w_v x_v, x): a -inf logit gives x_v = +-inf or nan where w_v = 0; such terms count 0 (0 log 0)."""
    total = torch.linalg.vecdot(w, x)
    if not bool(torch.isfinite(total).all()):
        x = torch.where(w > 0, x, 0.0)
        total = torch.linalg.vecdot(w, x)
    return total, x


class _ReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_b_N_V: torch.Tensor, t_b_N_V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lse_s = torch.logsumexp(s_b_N_V, -1, keepdim=True)
        lse_t = torch.logsumexp(t_b_N_V, -1, keepdim=True)
        p = torch.sub(s_b_N_V, lse_s).exp_()
        kl, d = weighted_sum(p, log_ratio(s_b_N_V, lse_s, t_b_N_V, lse_t))
        ctx.save_for_backward(p, d, kl)
        return kl, lse_t.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor, _grad_lse: torch.Tensor) -> tuple[torch.Tensor, None]:
        p, d, kl = ctx.saved_tensors
        return d.sub_(kl.unsqueeze(-1)).mul_(p).mul_(grad_kl.unsqueeze(-1)), None


class _ForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_b_N_V: torch.Tensor, t_b_N_V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lse_s = torch.logsumexp(s_b_N_V, -1, keepdim=True)
        lse_t = torch.logsumexp(t_b_N_V, -1, keepdim=True)
        q = torch.sub(t_b_N_V, lse_t).exp_()
        kl, _ = weighted_sum(q, log_ratio(t_b_N_V, lse_t, s_b_N_V, lse_s))
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
