"""A full-vocabulary KL step whose gradient is made during the forward pass, a block of positions at a time, when
nothing but the KL needs the student's logits to carry a gradient.

Why: with several blocks (`logit_chunk`), `chunked.token_scores` runs each block under activation checkpointing,
so backward recomputes the block: the student's and the teacher's vocabulary projections and every pass over
[rows, block, V] run twice. When a step's only gradient is the token mean of a KL to the teacher (`alpha: 0`, as
in TRL's distillation loss), each token's weight in the loss is known before the forward (its loss mask over
the micro-batch's mask count), so each block can take the KL, its gradient wrt the block's logits, and push that
gradient through the LM head at once: the hidden states' gradient and the head weight's gradient accumulate, the
block's logits are freed, and nothing is recomputed. Backward only scales the two accumulated gradients by the
loss's upstream gradient. (Liger-Kernel's fused linear cross-entropy works this way; here the target is a
teacher's distribution.) The student's logprobs, entropy and the teacher's logprobs of the sampled tokens come
out of the same blocks, detached: with `alpha: 0` they are metrics only.

Used by `policy.policy_loss` for the objectives whose table entry names a `fused_head` (full_reverse_kl,
forward_kl) when there is no GRPO term, several blocks, and a plain head (a bias-free `nn.Linear`, no final map,
float32 or float64 weights, no autocast); otherwise the checkpointed blocks run. The same loss and gradients to float rounding (`tests/test_fused_head.py`, float64).
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.position_blocks import block_bounds, block_rows, row_slice
from ..core.scoring import LogitBlocks
from ..models.forward import LogitHead, plain_weight
from .chunked import Scores
from .fused_kl import kl_parts


def fusable(head: LogitHead | None, K: int, chunk: int | None) -> bool:
    """Whether `head` is a plain projection this module can differentiate by hand (`plain_weight`), and the step
    has several blocks (one block is the unchunked computation, kept op for op)."""
    return plain_weight(head) is not None and len(block_bounds(K, chunk)) > 1


def fused_kl_scores(hidden_B_K_H: torch.Tensor, head: LogitHead, targets_B_W: torch.Tensor,
                    live_B_W: torch.Tensor, weights_B_W: torch.Tensor, chunk: int, teacher: LogitBlocks,
                    kind: str, temperature: float = 1.0) -> Scores:
    """The scores `token_scores` returns for a KL objective, [B, W] each: "logprobs", "entropy", "teacher_lp",
    "pg_logprobs" (temperature != 1), all detached, and "loss": the per-token KL (detached) plus a zero-valued
    term that carries the gradient of sum_t weights_t KL_t, so that a token mean over the mask whose
    denominator made `weights` has the true gradient."""
    out: dict[str, Any] = {}
    weighted = _FusedHeadKL.apply(hidden_B_K_H, head.projection.weight,
                                  (targets_B_W, live_B_W, weights_B_W, chunk, teacher, kind, temperature), out)
    out["loss"] = out.pop("kl") + (weighted - weighted.detach())
    return out


class _FusedHeadKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_B_K_H, weight_V_H, plan, out):
        targets_B_W, live_B_W, weights_B_W, chunk, teacher, kind, temperature = plan
        B, K, _ = hidden_B_K_H.shape
        want_hidden, want_weight = ctx.needs_input_grad[:2]  # a frozen head (LoRA elsewhere): no weight GEMM
        grad_hidden = torch.zeros_like(hidden_B_K_H) if want_hidden else None
        grad_weight = torch.zeros_like(weight_V_H) if want_weight else None
        names = ["logprobs", "entropy", "teacher_lp", "kl"] + (["pg_logprobs"] if temperature != 1.0 else [])
        for name in names:
            out[name] = hidden_B_K_H.new_zeros((B, K - 1))
        total = hidden_B_K_H.new_zeros(())
        for start, stop in block_bounds(K, chunk):
            n = min(stop, K - 1) - start
            cols = slice(start, start + n)
            rows = block_rows(live_B_W, start, n, True)
            h_b_N_H = row_slice(hidden_B_K_H, rows, cols).contiguous()
            s_b_N_V = h_b_N_H @ weight_V_H.T
            t_b_N_V = teacher(start, stop, rows)[:, :n].to(s_b_N_V.dtype)
            y_b_N = row_slice(targets_B_W, rows, cols)
            w_b_N = row_slice(weights_B_W, rows, cols).to(s_b_N_V.dtype)
            values, grad_b_N_V = _block(s_b_N_V, t_b_N_V, y_b_N, w_b_N, kind, temperature)
            total += (values["kl"] * w_b_N).sum()
            if grad_hidden is not None:
                grad_hidden[(slice(None) if rows is None else rows), cols] = grad_b_N_V @ weight_V_H
            if grad_weight is not None:
                grad_weight.addmm_(grad_b_N_V.reshape(-1, grad_b_N_V.shape[-1]).T,
                                   h_b_N_H.reshape(-1, h_b_N_H.shape[-1]))
            for name, v in values.items():
                out[name][(slice(None) if rows is None else rows), cols] = v
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_total,
                None if grad_weight is None else grad_weight * grad_total, None, None)


def _block(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor, kind: str,
           temperature: float) -> tuple[Scores, torch.Tensor]:
    """One block's per-token values and the gradient of sum w * KL wrt the student's logits `s` ([b, n, V]),
    made in place over the block's buffers."""
    if kind == "reverse":
        kl, p, r, lse_s, lse_t = kl_parts(s, t)
    else:
        kl, q, _, lse_t, lse_s = kl_parts(t, s)
        p = torch.sub(s, lse_s).exp_()
    values = {"kl": kl, "logprobs": (s.gather(-1, y[..., None]) - lse_s).squeeze(-1),
              "teacher_lp": (t.gather(-1, y[..., None]) - lse_t).squeeze(-1),
              "entropy": lse_s.squeeze(-1) - torch.linalg.vecdot(p, s)}
    del t
    if temperature != 1.0:
        tempered = s / temperature
        values["pg_logprobs"] = (tempered.gather(-1, y[..., None])
                                 - torch.logsumexp(tempered, -1, keepdim=True)).squeeze(-1)
        del tempered
    if kind == "reverse":  # d KL(p || q) / d s = p (log p - log q - KL)
        return values, r.sub_(kl[..., None]).mul_(p).mul_(w[..., None])
    return values, p.sub_(q).mul_(w[..., None])  # d KL(q || p) / d s = p - q
