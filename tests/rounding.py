"""Rounding bounds that the numeric tests derive their tolerances from, instead of measuring them on one CPU.

CI runs on whichever CPU its machine has (AVX2 or AVX512 AMD EPYC, Intel Xeon with AMX), and MKL, oneDNN and
ATen choose kernels, blocking and summation order by CPU and by tensor shape. What every kernel does guarantee is
IEEE rounding of each operation: |fl(a op b) - a op b| <= u |a op b|, with u the unit roundoff. From that alone
(Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section 3.1), a sum or dot product of n terms,
in ANY order and blocking, is within gamma(n) * sum_i |x_i| of the exact value. Two code paths that compute the
same quantity with different kernels therefore differ by at most the sum of their two bounds.

Along a forward pass the reductions come one after the other; to first order their relative errors add, so one
logit of a decoder is within gamma(N) of its magnitude scale, N the terms summed along its path
(`decoder_path_terms`). That is a bound on what any CPU may do, hence loose: the rounding actually seen on one
CPU is typically sqrt(N) u, not N u. It stays orders of magnitude below what a bug makes (a shifted position,
a missing term or a wrong sign changes a logprob by O(0.1 - 1)).

In float64 the same N gives gamma(N, U64) ~ 1e-13 for N ~ 1e3: comparing two code paths in float64 leaves
orders of magnitude between any CPU's rounding and a tolerance of 1e-10 or so; several tests do that.
"""

from __future__ import annotations

U32 = 2.0**-24  # float32 unit roundoff (half an ulp of 1)
U64 = 2.0**-53  # float64


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative bound of an n-term sum or dot product in any order."""
    assert n * u < 1, (n, u)
    return n * u / (1 - n * u)


def decoder_path_terms(cfg, positions: int, vocab: int) -> int:
    """Terms one next-token logprob of a tiny decoder (`TinyModelConfig` `cfg`) accumulates along its path.

    Per layer: the two RMSNorms' mean of squares (hidden), q/k/v (hidden each, counted once: they run side by
    side), q.k (head_dim), the attention softmax and its weighted sum (`positions` each), o_proj (hidden), gate/up
    (hidden, side by side), down (intermediate). Then the final norm and the head (hidden each) and the
    log-softmax's sum over the vocabulary.
    """
    h, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.heads
    per_layer = 2 * h + h + head_dim + 2 * positions + h + h + cfg.intermediate_size
    return cfg.layers * per_layer + 2 * h + vocab


def two_path_logprob_tol(cfg, logits_B_T_V) -> float:
    """How far apart two float32 code paths (a KV-cached decode and a full forward, a padded batch and one row)
    may put the same token's logprob under the tiny decoder `cfg`, whose logits (either path's) are
    `logits_B_T_V`: each path's logit and log-sum-exp are within gamma(N) S of the exact ones (S the largest
    |logit|, N = `decoder_path_terms`), so its logprob within 2 gamma(N) S, and the two paths within twice that.

    S stands for the magnitude of what the reductions sum. In these tiny models RMS-normalized hidden states meet
    small weights, so the largest logit is of the order of the sums of |terms| along the path; counting N u in
    full (rounding errors of random sign add up to ~sqrt(N) u) leaves a factor sqrt(N) ~ 25 for the rest.
    """
    N = decoder_path_terms(cfg, logits_B_T_V.shape[1], logits_B_T_V.shape[-1])
    return 4 * gamma(N) * float(logits_B_T_V.detach().abs().max())


def sampler_logprob_tol(logits_B_T_V) -> float:
    """How far the sampler's recorded float32 logprob may lie from the exact logprob of float64 logits
    `logits_B_T_V` (a float64 model: the sampler rounds its logits with `.float()`), S the largest |logit|:
    rounding a logit moves it by <= u S, hence the drawn token's logit and the log-sum-exp by <= 2 u S together;
    the float32 log-softmax then rounds x - max (<= 2 u S, in each exponent and in the result), each exponential
    (<= 4 ulps = 8 u, relative), the sum of V positive terms (gamma(V), relative: no cancellation), its log and
    the last subtraction (u |lse| and u |logprob|, both <= 2 S + log V)."""
    import math

    S = float(logits_B_T_V.detach().abs().max())
    V = logits_B_T_V.shape[-1]
    return gamma(V) + U32 * (2 * S + 4 * S + 8 + 2 * (2 * S + math.log(V)))


def two_path_grad_tol(cfg, positions: int, vocab: int, tokens: int, grads) -> float:
    """How far apart two float32 code paths (micro-batches, a completion window, another kernel) may put an entry
    of the same parameter gradient of the tiny decoder `cfg`, for a loss over `tokens` tokens of windows of
    `positions` and a vocabulary of `vocab` (`grads`: either path's gradients, name -> tensor). Each entry sums
    the tokens' contributions, each made through N terms forward and N backward (N = `decoder_path_terms`): per
    path within gamma(2N + tokens) S, S the magnitude scale of what is summed, taken as the largest gradient
    entry (the sum length counted in full, not the sqrt(n) that random-sign rounding makes, covers what
    cancellation between tokens hides of S); two paths within twice that.
    """
    S = max(float(g.abs().max()) for g in grads.values() if g is not None)
    return 2 * gamma(2 * decoder_path_terms(cfg, positions, vocab) + tokens) * S


def head_logprob_tol(model, ids_B_T, mask_B_T) -> float:
    """How far one float32 path's logprob may lie from the exact one when only the LM head and the log-softmax
    differ between the paths (blocks of positions of the same final hidden states, computed once): each logit
    is a dot product of H terms, within gamma(H) sum_i |h_i w_vi| (computed here from the model's own hidden
    states and head), and the float32 log-softmax adds gamma(V + 4) of 2 S (S the largest |logit|). A logprob
    moves by its logit's error and the log-sum-exp's (weights summing to 1): twice the first."""
    import torch

    from mopd.models.forward import final_hidden

    with torch.no_grad():
        hidden, head = final_hidden(model, ids_B_T, mask_B_T)
        weight = head.projection.weight
        terms = float((hidden.abs() @ weight.abs().T).max())
        S = float(head(hidden).abs().max())
    V, H = weight.shape
    return 2 * gamma(H) * terms + gamma(V + 4) * 2 * S
