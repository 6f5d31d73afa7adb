"""Full-distribution distillation losses on the student's own rollouts.

Where `advantages.opd_advantages` uses one sampled token per position (a Monte Carlo estimate of the reverse
KL), these losses compare whole next-token distributions at every completion position. Inputs:
- `student_logits_B_T_V` (with grad) and `teacher_logits_B_T_V` (detached here), both aligned like logprobs:
  position t holds the distribution that produced token t. From raw causal-LM logits pass
  `logits_B_T_V[:, :-1]` together with `mask_B_T[:, 1:]`.
- `mask_B_T`: 1 on completion positions.
Every loss is a token mean over the mask, computed in float32, and returns `(loss, metrics)`.

Objectives (p = pi_S student, q = pi_T teacher, sums over the vocabulary):
- full reverse KL  KL(p || q)                 mode-seeking; DeepSeek-V4-style full-vocabulary OPD
- forward KL       KL(q || p)                 mass-covering; classic (Hinton) distillation on student rollouts
- generalized JSD  GKD, Agarwal et al. 2024, arXiv:2306.13649, Sec. 3
- top-k reverse KL reverse KL between coarse-grained distributions over the teacher's top-k tokens + "rest",
                   so a teacher only ships K logprobs and ids per position
"""

from __future__ import annotations

import math

import torch

from ..core.divergence import categorical_kl, log_softmax_pair
from ..core.logprobs import masked_mean, upcast


def full_reverse_kl_loss(
    student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor, mask_B_T: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reverse KL over the full vocabulary, token-mean over the mask.

        loss = mean_{t in mask} sum_v p_v (log p_v - log q_v),  p = softmax(student), q = softmax(teacher)

    Its gradient is the exact (zero-variance) version of the sampled-token OPD gradient at each position.

    Returns:
        loss: 0-dim tensor, grad wrt the student logits only.
        metrics: "distill/reverse_kl".
    """
    _check_pair(student_logits_B_T_V, teacher_logits_B_T_V, mask_B_T)
    loss = masked_mean(reverse_kl_tokens(student_logits_B_T_V, teacher_logits_B_T_V), mask_B_T)
    return loss, {"distill/reverse_kl": float(loss.detach())}


def reverse_kl_tokens(student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor) -> torch.Tensor:
    """KL(p || q) at each position, [B, T] (the per-token terms of `full_reverse_kl_loss`)."""
    logp_B_T_V, logq_B_T_V = log_softmax_pair(student_logits_B_T_V, teacher_logits_B_T_V)
    return categorical_kl(logp_B_T_V, logq_B_T_V)


def forward_kl_loss(
    student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor, mask_B_T: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward KL over the full vocabulary, token-mean over the mask.

        loss = mean_{t in mask} sum_v q_v (log q_v - log p_v),  p = softmax(student), q = softmax(teacher)

    (GKD with divergence KL(q||p) on student-generated sequences, arXiv:2306.13649.)

    Returns:
        loss: 0-dim tensor, grad wrt the student logits only.
        metrics: "distill/forward_kl".
    """
    _check_pair(student_logits_B_T_V, teacher_logits_B_T_V, mask_B_T)
    loss = masked_mean(forward_kl_tokens(student_logits_B_T_V, teacher_logits_B_T_V), mask_B_T)
    return loss, {"distill/forward_kl": float(loss.detach())}


def forward_kl_tokens(student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor) -> torch.Tensor:
    """KL(q || p) at each position, [B, T] (the per-token terms of `forward_kl_loss`)."""
    logp_B_T_V, logq_B_T_V = log_softmax_pair(student_logits_B_T_V, teacher_logits_B_T_V)
    return categorical_kl(logq_B_T_V, logp_B_T_V)


def generalized_jsd_loss(
    student_logits_B_T_V: torch.Tensor,
    teacher_logits_B_T_V: torch.Tensor,
    mask_B_T: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, arXiv:2306.13649, Sec. 3):

        m     = beta * q + (1 - beta) * p                       (q = teacher, p = student)
        JSD_b = beta * KL(q || m) + (1 - beta) * KL(p || m),    loss = mean_{t in mask} JSD_b

    beta must lie in the open interval (0, 1); beta = 0.5 is the symmetric JSD (bounded by log 2). Endpoints:
    JSD_b -> 0 at both, but its leading term is the forward KL as beta -> 0 (JSD_b / beta -> KL(q || p)) and
    the reverse KL as beta -> 1 (JSD_b / (1 - beta) -> KL(p || q)); use `forward_kl_loss` /
    `full_reverse_kl_loss` for those limits. (Same convention as TRL's GKDTrainer: beta -> 0 is forward KL.)
    log m = logaddexp(log(beta) + log q, log(1 - beta) + log p), elementwise (no stacked copy).

    Returns:
        loss: 0-dim tensor, grad wrt the student logits only (through p and m).
        metrics: "distill/jsd".
    """
    _check_pair(student_logits_B_T_V, teacher_logits_B_T_V, mask_B_T)
    loss = masked_mean(jsd_tokens(student_logits_B_T_V, teacher_logits_B_T_V, beta), mask_B_T)
    return loss, {"distill/jsd": float(loss.detach())}


def jsd_tokens(student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD_beta at each position, [B, T] (the per-token terms of `generalized_jsd_loss`)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(
            f"beta must be in (0, 1), got {beta}; use forward_kl_loss (beta -> 0) or full_reverse_kl_loss "
            "(beta -> 1)"
        )
    logp_B_T_V, logq_B_T_V = log_softmax_pair(student_logits_B_T_V, teacher_logits_B_T_V)
    q_part_B_T_V, p_part_B_T_V = logq_B_T_V + math.log(beta), logp_B_T_V + math.log1p(-beta)
    # a masked student vocabulary (`objective_table.restrict_to_shared`): where neither side has mass, logaddexp's
    # backward would be nan; one pass over the student's side finds out, so an unmasked step pays only that
    if bool(torch.isneginf(p_part_B_T_V).any()):
        none_B_T_V = torch.isneginf(q_part_B_T_V) & torch.isneginf(p_part_B_T_V)
        q_part_B_T_V, p_part_B_T_V = (torch.where(none_B_T_V, 0.0, x) for x in (q_part_B_T_V, p_part_B_T_V))
        logm_B_T_V = torch.where(none_B_T_V, -torch.inf, torch.logaddexp(q_part_B_T_V, p_part_B_T_V))
    else:
        logm_B_T_V = torch.logaddexp(q_part_B_T_V, p_part_B_T_V)
    return beta * categorical_kl(logq_B_T_V, logm_B_T_V) + (1.0 - beta) * categorical_kl(logp_B_T_V, logm_B_T_V)


def teacher_topk(teacher_logits_B_T_V: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely tokens per position and their (full-vocabulary) log-probabilities.

    Args:
        teacher_logits_B_T_V: teacher logits (computed in float32, no grad).
        k: 1 <= k <= V.

    Returns:
        topk_logprobs_B_T_K: float32 log q of the top-k tokens, descending.
        topk_ids_B_T_K: long token ids.
    """
    with torch.no_grad():
        logits_B_T_V = teacher_logits_B_T_V.float()
        top_logits_B_T_K, topk_ids_B_T_K = logits_B_T_V.topk(k, dim=-1)
        topk_logprobs_B_T_K = top_logits_B_T_K - torch.logsumexp(logits_B_T_V, dim=-1, keepdim=True)
    return topk_logprobs_B_T_K, topk_ids_B_T_K


def topk_reverse_kl_loss(
    student_logits_B_T_V: torch.Tensor,
    teacher_topk_logprobs_B_T_K: torch.Tensor,
    teacher_topk_ids_B_T_K: torch.Tensor,
    mask_B_T: torch.Tensor,
    min_rest_mass: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reverse KL between the coarse-grained distributions on the teacher's top-k support plus a "rest" bin.

    With S = the teacher's top-k ids at a position, coarse-grain both distributions to K + 1 outcomes
        p~ = [p_{s_1}, ..., p_{s_K}, p_rest = 1 - sum_k p_{s_k}],   q~ likewise (q from the teacher's logprobs),
    and use the exact KL between them:
        loss_t = sum_k p_{s_k} (log p_{s_k} - log q_{s_k}) + p_rest (log p_rest - log q_rest).
    By the chain rule of KL this equals
        KL(Bern(P_in) || Bern(Q_in)) + P_in * KL(p|_S || q|_S),   P_in = sum_k p_{s_k}, Q_in = sum_k q_{s_k},
    i.e. the KL between the top-k-renormalised distributions (weighted by the student's mass on S) plus the
    KL between the "inside top-k vs outside" Bernoullis. So the loss is a proper divergence: >= 0, and 0 iff
    p_{s_k} = q_{s_k} for all k (hence p_rest = q_rest); how the student spreads p_rest over the other tokens is
    unconstrained. By the data-processing inequality it lower-bounds the full reverse KL, with equality when
    K = V. Dropping the p_rest term instead would not be a divergence (the student could lower it by moving
    mass off the support).

    Numerics: the student's log p_rest is a logsumexp over the non-top-k logits (no 1 - sum cancellation);
    the teacher's q_rest comes from the K logprobs alone (1 - sum exp) and is floored at `min_rest_mass`
    because rounding of shipped logprobs can push sum_k q_{s_k} to >= 1.

    Args:
        student_logits_B_T_V: student logits, with grad, aligned like logprobs.
        teacher_topk_logprobs_B_T_K: the teacher's full-vocabulary log q of its top-k tokens (e.g. from
            `teacher_topk`); detached here.
        teacher_topk_ids_B_T_K: their ids (long, distinct within a position).
        mask_B_T: 1 on completion positions.
        min_rest_mass: floor on the teacher's rest mass q_rest.

    Returns:
        loss: 0-dim tensor, grad wrt the student logits only.
        metrics: "distill/topk_reverse_kl", "distill/teacher_topk_mass" (mean Q_in),
            "distill/student_topk_mass" (mean P_in), both over mask tokens.
    """
    kl_B_T, logp_rest_B_T, logq_in_B_T = topk_reverse_kl_tokens(
        student_logits_B_T_V, teacher_topk_logprobs_B_T_K, teacher_topk_ids_B_T_K, min_rest_mass
    )
    loss = masked_mean(kl_B_T, mask_B_T)
    return loss, topk_metrics(loss, logp_rest_B_T, logq_in_B_T, mask_B_T)


def topk_metrics(
    loss: torch.Tensor, logp_rest_B_T: torch.Tensor, logq_in_B_T: torch.Tensor, mask_B_T: torch.Tensor
) -> dict[str, float]:
    """The metrics of `topk_reverse_kl_loss` from its token mean and per-token rest / top-k masses."""
    return {
        "distill/topk_reverse_kl": float(loss.detach()),
        "distill/teacher_topk_mass": float(masked_mean(logq_in_B_T.exp(), mask_B_T)),
        "distill/student_topk_mass": float(masked_mean(-torch.expm1(logp_rest_B_T.detach()), mask_B_T)),
    }


def topk_reverse_kl_tokens(
    student_logits_B_T_V: torch.Tensor,
    teacher_topk_logprobs_B_T_K: torch.Tensor,
    teacher_topk_ids_B_T_K: torch.Tensor,
    min_rest_mass: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-token terms of `topk_reverse_kl_loss`: (KL of the coarse-grained distributions [B, T] with grad,
    the student's log p_rest [B, T], the teacher's log Q_in [B, T])."""
    if teacher_topk_logprobs_B_T_K.shape != teacher_topk_ids_B_T_K.shape:
        raise ValueError(
            f"top-k logprobs {tuple(teacher_topk_logprobs_B_T_K.shape)} and ids "
            f"{tuple(teacher_topk_ids_B_T_K.shape)} must have the same shape"
        )
    logits_B_T_V = upcast(student_logits_B_T_V)
    lse_B_T = torch.logsumexp(logits_B_T_V, dim=-1)
    ids_B_T_K = teacher_topk_ids_B_T_K.long()
    logp_B_T_K = logits_B_T_V.gather(-1, ids_B_T_K) - lse_B_T[..., None]
    # a -inf teacher entry is no outcome (a teacher of another tokenizer with fewer than k shared tokens there,
    # `teachers.shared_support`; its id repeats a real one's): the student's entry goes too (0 log 0 = 0)
    logp_B_T_K = torch.where(torch.isfinite(teacher_topk_logprobs_B_T_K), logp_B_T_K, -torch.inf)
    # log p_rest = logsumexp over the logits outside the top-k, minus the normaliser. Rows with nothing outside
    # (K = V) get p_rest = 0 via a where, so logsumexp never sees an all -inf row (its backward would be nan).
    outside_B_T_V = logits_B_T_V.scatter(-1, ids_B_T_K, -torch.inf)
    has_rest_B_T = torch.isfinite(outside_B_T_V).any(-1)
    outside_B_T_V = torch.where(has_rest_B_T[..., None], outside_B_T_V, 0.0)
    logp_rest_B_T = torch.where(has_rest_B_T, torch.logsumexp(outside_B_T_V, dim=-1) - lse_B_T, -torch.inf)

    logq_B_T_K = upcast(teacher_topk_logprobs_B_T_K.detach())
    logq_in_B_T = torch.logsumexp(logq_B_T_K, dim=-1).clamp(max=math.log1p(-min_rest_mass))
    logq_rest_B_T = _log1mexp(logq_in_B_T)

    # KL between the (K + 1)-outcome coarse-grained distributions [p_s1 .. p_sK, p_rest] and [q_s1 .. q_rest]
    kl_B_T = categorical_kl(
        torch.cat([logp_B_T_K, logp_rest_B_T[..., None]], dim=-1),
        torch.cat([logq_B_T_K, logq_rest_B_T[..., None]], dim=-1),
    )
    return kl_B_T, logp_rest_B_T, logq_in_B_T


def _check_pair(
    student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor, mask_B_T: torch.Tensor
) -> None:
    if (
        student_logits_B_T_V.shape != teacher_logits_B_T_V.shape
        or student_logits_B_T_V.shape[:2] != mask_B_T.shape
    ):
        raise ValueError(
            f"student {tuple(student_logits_B_T_V.shape)} and teacher {tuple(teacher_logits_B_T_V.shape)} "
            f"logits must be [B, T, V] with [B, T] = mask {tuple(mask_B_T.shape)}"
        )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
