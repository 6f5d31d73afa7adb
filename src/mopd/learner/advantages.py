"""Advantage estimators: small pure functions that turn rewards / teacher scores into per-token advantages.

Contract: every estimator returns `advantages_B_T` aligned to `input_ids_B_T`
(zero outside the completion mask) plus a dict of namespaced python-float metrics; `policy_gradient_loss`
in `losses.py` consumes them. Nothing here carries gradient: advantages are constants (stop-gradient).

Estimators:
- GRPO (group-relative, outcome reward)          DeepSeekMath, Shao et al. 2024, arXiv:2402.03300, Sec. 4.1.2
- OPD  (on-policy distillation, per-token)       Agarwal et al. 2024 (GKD) / Thinking Machines "On-Policy
                                                 Distillation" (2025): advantage = -(log pi_S - log pi_T)
- MOPD (multi-teacher OPD)                       OPD where a per-row domain key routes to one teacher
                                                 (`core.routing`): OPD advantages, `mopd_metrics`
- combined                                       A = A_OPD + alpha * A_GRPO
"""

from __future__ import annotations

import torch

from ..core.logprobs import masked_mean


def grpo_advantages(
    rewards_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    completion_mask_B_T: torch.Tensor,
    eps: float = 1e-6,
    drop_zero_variance: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Group-relative advantages (GRPO, outcome supervision), broadcast to every completion token.

    DeepSeekMath (Shao et al. 2024, arXiv:2402.03300), Sec. 4.1.2 "outcome supervision":
        A_i = (r_i - mean_{j in G(i)} r_j) / (std_{j in G(i)} r_j + eps),   A_{i,t} = A_i for every token t,
    where G(i) is the group of rollouts sampled from the same prompt and std is the *population* standard
    deviation (divide by |G|, not |G| - 1).

    Groups whose rewards are all equal (zero variance, including singleton groups) carry no learning signal:
    their advantage is exactly 0 (no eps-divided rounding noise). With `drop_zero_variance` they are also
    marked `keep_B = False` so a pure-GRPO loss removes their tokens from its token-mean denominator (as in
    DAPO's dynamic sampling, arXiv:2503.14476). When GRPO is combined with OPD do NOT apply `keep_B`: those
    rows still carry an OPD signal, and their GRPO term is already 0.

    Args:
        rewards_B: float rewards, one per row.
        group_ids_B: long group id per row (rows from the same prompt share it; any integer values).
        completion_mask_B_T: 1 on completion tokens.
        eps: added to the std before dividing.
        drop_zero_variance: mark rows of zero-variance groups as not kept.

    Returns:
        advantages_B_T: float32, A_i on row i's completion tokens, 0 elsewhere.
        keep_B: bool; False for rows of zero-variance groups when `drop_zero_variance`, else all True.
        metrics: "grpo/reward_mean", "grpo/reward_std" (population, over the batch),
            "grpo/zero_variance_frac" (fraction of rows in zero-variance groups), "grpo/kept_frac".
    """
    if (
        rewards_B.dim() != 1
        or group_ids_B.shape != rewards_B.shape
        or completion_mask_B_T.shape[0] != len(rewards_B)
    ):
        raise ValueError(
            f"rewards {tuple(rewards_B.shape)}, group_ids {tuple(group_ids_B.shape)} and completion_mask "
            f"{tuple(completion_mask_B_T.shape)} must share the batch dimension B"
        )
    rewards_B = rewards_B.detach().double()  # float64 so mean/std of equal rewards stay exact enough
    _, group_B = torch.unique(group_ids_B, return_inverse=True)  # dense ids 0..G-1
    num_groups = int(group_B.max()) + 1 if len(group_B) else 0

    def per_group(values_B: torch.Tensor, reduce: str) -> torch.Tensor:  # [B] -> [G]
        init_G = rewards_B.new_zeros(num_groups)
        return init_G.scatter_reduce(0, group_B, values_B, reduce=reduce, include_self=False)

    mean_G = per_group(rewards_B, "mean")
    centered_B = rewards_B - mean_G[group_B]
    var_G = per_group(centered_B**2, "mean")  # population variance
    # Zero variance decided exactly (max == min), not by comparing a rounded std with 0.
    zero_var_G = per_group(rewards_B, "amax") == per_group(rewards_B, "amin")
    zero_var_B = zero_var_G[group_B]

    adv_B = centered_B / (var_G.sqrt()[group_B] + eps)
    adv_B = torch.where(zero_var_B, torch.zeros_like(adv_B), adv_B)
    advantages_B_T = adv_B.float()[:, None] * completion_mask_B_T.float()
    keep_B = ~zero_var_B if drop_zero_variance else torch.ones_like(zero_var_B)

    batch = max(len(rewards_B), 1)
    metrics = {
        "grpo/reward_mean": float(rewards_B.mean()) if len(rewards_B) else 0.0,
        "grpo/reward_std": float(rewards_B.std(correction=0)) if len(rewards_B) else 0.0,
        "grpo/zero_variance_frac": float(zero_var_B.sum()) / batch,
        "grpo/kept_frac": float(keep_B.sum()) / batch,
    }
    return advantages_B_T, keep_B, metrics


def opd_advantages(
    teacher_logprobs_B_T: torch.Tensor,
    student_logprobs_B_T: torch.Tensor,
    completion_mask_B_T: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """On-policy distillation advantage: the per-token negative reverse-KL estimate.

        A_t = sg[ log pi_T(y_t | y_<t) - log pi_S(y_t | y_<t) ] * mask_t,   y ~ pi_S

    (Thinking Machines, "On-Policy Distillation", 2025; Agarwal et al. 2024, GKD, arXiv:2306.13649, with
    reverse KL). Fed to `policy_gradient_loss` with ratio 1, the gradient -E[A_t grad log pi_S(y_t)] equals
    grad sum_t E_{y_<t ~ sg pi_S}[ KL(pi_S(.|y_<t) || pi_T(.|y_<t)) ]: the per-position reverse KL with the
    prefix distribution held fixed (discount 0 — future tokens' log-ratios are not credited to y_t, unlike the
    gradient of the full sequence-level KL).

    Both inputs are detached. `student_logprobs_B_T` is normally the sampler's logprobs (the policy that
    generated y), so that the importance ratio in the loss corrects for learner/sampler mismatch.

    Args:
        teacher_logprobs_B_T: log pi_T of each sampled token, aligned to input_ids.
        student_logprobs_B_T: log pi_S of each sampled token, aligned to input_ids.
        completion_mask_B_T: 1 on completion tokens.

    Returns:
        advantages_B_T: float32, zero outside the mask.
        metrics: "opd/reverse_kl" = masked mean of (log pi_S - log pi_T), an unbiased per-token estimate of
            E_t KL(pi_S || pi_T) under the student's own rollouts.
    """
    mask_B_T = completion_mask_B_T.float()
    log_ratio_B_T = student_logprobs_B_T.detach().float() - teacher_logprobs_B_T.detach().float()
    advantages_B_T = torch.where(mask_B_T > 0, -log_ratio_B_T * mask_B_T, torch.zeros_like(log_ratio_B_T))
    return advantages_B_T, {"opd/reverse_kl": float(masked_mean(log_ratio_B_T, mask_B_T))}


def chunk_advantages(
    teacher_logprobs_B_T: torch.Tensor,
    student_logprobs_B_T: torch.Tensor,
    completion_mask_B_T: torch.Tensor,
    chunk_B_T: torch.Tensor,
) -> torch.Tensor:
    """The on-policy distillation advantage over aligned chunks (a teacher of another tokenizer,
    `teachers.cross_tokenizer`): every student token t of chunk c gets

        A_t = sg[ log pi_T(c) - log pi_S(c) ] * mask_t,   log pi(c) = sum of the chunk's token logprobs,

    the chunk's reverse-KL estimate; a token in no chunk (`chunk_B_T` < 0: a template token of one side only)
    gets 0. `teacher_logprobs_B_T` carries each chunk's teacher logprob on any of its tokens (0 on the others).
    With one token per chunk this is `opd_advantages`' advantage exactly: each sum adds one value to 0.
    """
    B, T = completion_mask_B_T.shape
    mask_B_T = completion_mask_B_T.float()
    live = (chunk_B_T >= 0) & (mask_B_T > 0)
    index = (torch.arange(B, device=chunk_B_T.device)[:, None] * T + chunk_B_T.clamp(min=0))[live]
    student = student_logprobs_B_T.detach().float()[live]
    teacher = teacher_logprobs_B_T.detach().float()[live]
    s_sum = student.new_zeros(B * T).index_add_(0, index, student)
    t_sum = teacher.new_zeros(B * T).index_add_(0, index, teacher)
    out = torch.zeros_like(mask_B_T)
    out[live] = -(s_sum[index] - t_sum[index]) * mask_B_T[live]
    return out


def mopd_metrics(
    opd_advantages_B_T: torch.Tensor, completion_mask_B_T: torch.Tensor, teacher_names_B: list[str]
) -> dict[str, float]:
    """Multi-teacher OPD's metrics, from plain OPD advantages (`opd_advantages`) of rows whose teacher logprobs
    came from their routed teachers `teacher_names_B` (`core.routing.route_teachers`). Multi-teacher OPD is
    routing, not a new advantage (e.g. the multi-teacher stage of Xiaomi MiMo-V2-Flash), so only its metrics are
    its own; they are separate from the advantages because the learner computes those per micro-batch and these
    once over the whole batch.

    Returns:
        "mopd/reverse_kl" (all rows), and per teacher t: "mopd/reverse_kl/<t>" (masked token mean of the
        reverse-KL estimate -A over t's rows) and "mopd/routing_share/<t>" (fraction of rows routed to t).
    """
    batch = opd_advantages_B_T.shape[0]
    if len(teacher_names_B) != batch:
        raise ValueError(f"teacher_names_B has {len(teacher_names_B)} names for {batch} rows")
    mask_B_T = completion_mask_B_T.float()
    metrics = {"mopd/reverse_kl": float(masked_mean(-opd_advantages_B_T, mask_B_T))}
    for teacher in sorted(set(teacher_names_B)):
        rows_B = torch.tensor([name == teacher for name in teacher_names_B], device=mask_B_T.device)
        # reverse-KL estimate = -advantage on masked tokens
        metrics[f"mopd/reverse_kl/{teacher}"] = float(masked_mean(-opd_advantages_B_T, mask_B_T * rows_B[:, None]))
        metrics[f"mopd/routing_share/{teacher}"] = float(rows_B.sum()) / batch
    return metrics


def combine_advantages(opd_B_T: torch.Tensor, grpo_B_T: torch.Tensor, alpha: float) -> torch.Tensor:
    """Dense teacher signal plus scaled outcome signal: A = A_OPD + alpha * A_GRPO (per token).

    Both inputs must already be zero outside the completion mask (as the estimators return them). Pass the
    plain completion mask to the loss (not GRPO's `keep_B`): zero-variance groups keep their OPD term.

    Args:
        opd_B_T: advantages from `opd_advantages`.
        grpo_B_T: advantages from `grpo_advantages`.
        alpha: weight of the GRPO term.

    Returns:
        advantages_B_T.
    """
    if opd_B_T.shape != grpo_B_T.shape:
        raise ValueError(f"shape mismatch: opd {tuple(opd_B_T.shape)} vs grpo {tuple(grpo_B_T.shape)}")
    return opd_B_T + alpha * grpo_B_T
