"""Per-token log-probabilities and entropies from causal-LM logits, aligned to `input_ids`.

A causal LM's logits at position t-1 give the distribution of token t. Everything downstream (the rollout
batch, advantages, losses) stores a token's value at the token's own position (see `batch.py`), so:

    logprobs_B_T[b, t] = log softmax(logits_B_T_V[b, t-1])[input_ids_B_T[b, t]]   for t >= 1
    logprobs_B_T[b, 0] = 0                                                        (nothing predicts it)

Departures from the naive `log_softmax(logits).gather(...)`:
- we compute `logit[y] - logsumexp(logits)` instead of materialising (and saving for backward) a second
  [B, T, V] log-softmax tensor; the only full-vocabulary temporaries are the float32 copy of the logits and
  the ones inside `logsumexp`;
- the arithmetic is float32 even when the model runs in bf16 (bf16 log-softmax loses ~2 digits); float64 stays
  float64 (`upcast`).

Full-vocabulary objectives (`objectives.py`) need aligned *logits* rather than logprobs: pass
`logits_B_T_V[:, :-1]` with `mask_B_T[:, 1:]` (a view, no copy) — position t of that slice is the
distribution that produced token t+1.
"""

from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or kept in float64: losses are computed in at least float32 (bf16 loses digits), and a
    float64 model (an exact-math test) keeps its precision."""
    return x if x.dtype == torch.float64 else x.float()


def token_logprobs(logits_B_T_V: torch.Tensor, input_ids_B_T: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token under the distribution that produced it, aligned to `input_ids`.

    logprobs[b, t] = logits[b, t-1, y_t] - logsumexp_v logits[b, t-1, v], with y_t = input_ids[b, t];
    logprobs[b, 0] = 0.

    Args:
        logits_B_T_V: causal-LM logits (any float dtype; computed in float32). May carry grad.
        input_ids_B_T: long token ids, same B and T.

    Returns:
        logprobs_B_T: float32, differentiable wrt the logits.
    """
    _check_aligned(logits_B_T_V, input_ids_B_T)
    logits_B_S_V = upcast(logits_B_T_V[:, :-1])  # S = T-1: position s predicts token s+1
    targets_B_S = input_ids_B_T[:, 1:]
    picked_B_S = logits_B_S_V.gather(-1, targets_B_S.unsqueeze(-1)).squeeze(-1)
    logprobs_B_S = picked_B_S - torch.logsumexp(logits_B_S_V, dim=-1)
    return _pad_front(logprobs_B_S)


def token_entropy(logits_B_T_V: torch.Tensor) -> torch.Tensor:
    """Entropy of the distribution that produced each token, aligned to `input_ids` like `token_logprobs`.

    H[b, t] = -sum_v p_v log p_v  with p = softmax(logits[b, t-1]),  computed as
    H = logsumexp(l) - sum_v p_v l_v  (no log-softmax tensor needed); H[b, 0] = 0.

    Args:
        logits_B_T_V: causal-LM logits (computed in float32). May carry grad.

    Returns:
        entropy_B_T: float32, in nats.
    """
    return _pad_front(aligned_token_entropy(logits_B_T_V[:, :-1]))


def aligned_token_entropy(aligned_logits_B_T_V: torch.Tensor, lse_B_T: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of each distribution of logits already aligned to their tokens (no shift), in float32 nats.
    `lse_B_T`: their logsumexp when the caller has it (`aligned_logprobs_and_lse`: one pass over [B, T, V] less)."""
    logits_B_S_V = upcast(aligned_logits_B_T_V)
    lse_B_S = torch.logsumexp(logits_B_S_V, dim=-1) if lse_B_T is None else lse_B_T
    probs_B_S_V = torch.softmax(logits_B_S_V, dim=-1)
    # 0 * (-inf) would be nan for masked-out vocabulary entries (logit -inf, prob 0): zero them first. Only when
    # there are such entries: with finite logits the zeroing changes no term (0 * finite = 0) and, at a real
    # vocabulary, cost three more passes over [B, S, V] (a comparison, a zero tensor, a select).
    if logits_B_S_V.numel() and bool(logits_B_S_V.amin() == float("-inf")):
        logits_B_S_V = torch.where(probs_B_S_V > 0, logits_B_S_V, torch.zeros_like(logits_B_S_V))
    return lse_B_S - (probs_B_S_V * logits_B_S_V).sum(-1)


def aligned_token_logprobs(aligned_logits_B_T_V: torch.Tensor, input_ids_B_T: torch.Tensor) -> torch.Tensor:
    """log softmax(logits[b, t])[input_ids[b, t]] for logits already aligned to their tokens (a teacher's
    `full_logits`), in float32."""
    return aligned_logprobs_and_lse(aligned_logits_B_T_V, input_ids_B_T)[0]


def aligned_logprobs_and_lse(
    aligned_logits_B_T_V: torch.Tensor, input_ids_B_T: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`aligned_token_logprobs`, the logsumexp of each position's logits): the entropy reuses the latter."""
    logits = upcast(aligned_logits_B_T_V)
    picked_B_T = logits.gather(-1, input_ids_B_T[..., None]).squeeze(-1)
    lse_B_T = torch.logsumexp(logits, dim=-1)
    return picked_B_T - lse_B_T, lse_B_T


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x * mask) / sum(mask), or 0 when the mask sums to 0.

    Masked-out entries are selected away (not multiplied), so a nan/inf there does not leak into the result.

    Args:
        x: values, any shape.
        mask: 0/1 (or non-negative weights), broadcastable to x.

    Returns:
        A 0-dim tensor (differentiable wrt x).
    """
    mask = mask.to(x.dtype)
    total = torch.where(mask > 0, x * mask, torch.zeros_like(x)).sum()
    denom = mask.expand_as(x).sum()
    return torch.where(denom > 0, total / denom.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(total))


def _pad_front(x_B_S: torch.Tensor) -> torch.Tensor:
    """[B, T-1] -> [B, T] with a zero column in front (position 0 has no predicting distribution)."""
    return torch.cat([x_B_S.new_zeros(x_B_S.shape[0], 1), x_B_S], dim=1)


def _check_aligned(logits_B_T_V: torch.Tensor, input_ids_B_T: torch.Tensor) -> None:
    if logits_B_T_V.dim() != 3 or logits_B_T_V.shape[:2] != input_ids_B_T.shape:
        raise ValueError(
            f"logits {tuple(logits_B_T_V.shape)} must be [B, T, V] with [B, T] = input_ids "
            f"{tuple(input_ids_B_T.shape)}"
        )


class _LogprobsAndEntropy(torch.autograd.Function):
    """`aligned_logprobs_and_lse` and `aligned_token_entropy` of the same logits in one pass's worth of work.

    Why: at a real vocabulary the elementwise passes over [b, n, V] (the logsumexp's max, shift, exp and sum, then
    the entropy's softmax, product and sum, and in backward the logsumexp's and the gather's gradients) cost as
    much as the vocabulary projection itself. Here the forward makes one shifted exponential and takes both sums
    from it, and the backward writes the gradient in place: (onehot(y) - softmax) * g. The entropy is a metric (no
    gradient). Equal to the composed functions up to float rounding; `learner.chunked` uses it only where that is
    the contract (several blocks), so one block stays op for op what the unchunked code computes.
    """

    @staticmethod
    def forward(ctx, logits, targets):
        shift = logits.amax(-1, keepdim=True)
        exps = torch.sub(logits, shift).exp_()
        total = exps.sum(-1, keepdim=True)
        lse = (shift + total.log()).squeeze(-1)
        logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - lse
        entropy = lse - torch.linalg.vecdot(exps, logits) / total.squeeze(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.sub(logits, lse[..., None]).exp_().mul_(-grad_logprobs[..., None])
        return grad.scatter_add_(-1, targets[..., None], grad_logprobs[..., None]), None


def fused_logprobs_and_entropy(
    aligned_logits_B_T_V: torch.Tensor, input_ids_B_T: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(logits)[y], entropy) per position, float32 (float64 kept), the first differentiable: the
    composed `aligned_logprobs_and_lse` / `aligned_token_entropy` up to float rounding, in fewer passes over V.
    Logits with -inf entries (a masked vocabulary) take the composed functions, which guard 0 * (-inf)."""
    logits = upcast(aligned_logits_B_T_V)
    if logits.numel() and bool(logits.detach().amin() == float("-inf")):
        logprobs, lse = aligned_logprobs_and_lse(logits, input_ids_B_T)
        return logprobs, aligned_token_entropy(logits.detach(), lse.detach())
    return _LogprobsAndEntropy.apply(logits, input_ids_B_T)
