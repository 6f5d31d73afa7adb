"""The objective table: what a policy step optimises, by name. A new objective is one entry here.

Each entry turns one micro-batch of the student's scored rollouts (`MicroBatch`) into its share of the step's
loss, and the kept per-token tensors into whole-batch metrics:

    grpo             A = A_GRPO                       (rlvr, mix_rl, cascade_rl: no teachers)
    sampled          A = A_MOPD (+ alpha * A_GRPO)    per-token reverse-KL advantage of the sampled token
                                                      (`advantages.mopd_advantages`), optional surprise weights
    topk             top-k reverse KL over the teacher's support (+ alpha * GRPO through the PG loss)
    full_reverse_kl  KL(pi_S || pi_T) over the full vocabulary (+ alpha * GRPO)
    forward_kl       KL(pi_T || pi_S) (+ alpha * GRPO)
    jsd              generalized JSD of GKD with `jsd_beta` (+ alpha * GRPO)

Advantage objectives feed the one policy-gradient loss (`losses.policy_gradient_loss`); distribution objectives
have a loss of their own over the teacher's distributions at every completion position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.batch import RolloutBatch
from ..core.logprobs import aligned_token_logprobs, masked_mean
from ..core.schema import DistillationSettings, SamplingSettings
from ..core.scoring import TeacherScorer
from .advantages import combine_advantages, mopd_advantages, mopd_metrics
from .diagnostics import teacher_diagnostics
from .losses import policy_gradient_loss, surprise_weights
from .objectives import forward_kl_loss, full_reverse_kl_loss, generalized_jsd_loss, topk_reverse_kl_loss

Kept = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MicroBatch:
    """Some rows of a step's rewarded batch with the student's scores of them (all rows without micro-batches).

    Student tensors cover the last K positions of the rows (the logits) or are aligned to input_ids (the
    logprobs). `share` is this micro-batch's fraction of the step's loss tokens, `total_tokens` the step's count.
    """

    batch: RolloutBatch
    loss_mask_B_T: torch.Tensor  # the completion mask, minus filtered groups (and, for pure GRPO, flat groups)
    logits_B_K_V: torch.Tensor  # the student's logits (with grad) at the last K positions
    logprobs_B_T: torch.Tensor  # log pi_S(y_t) (with grad)
    pg_logprobs_B_T: torch.Tensor  # the same at the sampling temperature: the importance ratio's numerator
    grpo_B_T: torch.Tensor | None  # GRPO advantages (None when the objective does not use them)
    names_B: list[str] | None  # routed teacher per row (None without teachers)
    share: float
    total_tokens: float


@dataclass(frozen=True)
class PolicyConfig:
    """What is fixed for a whole step: the sampling settings (importance correction, clipping), the distillation
    settings (None without teachers) and the teachers that score."""

    sampling: SamplingSettings
    distill: DistillationSettings | None = None
    teachers: TeacherScorer | None = None


def pg_loss(mb: MicroBatch, cfg: PolicyConfig, advantages_B_T: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy-gradient loss of `advantages_B_T` on this micro-batch, normalised by the whole step's tokens."""
    s = cfg.sampling
    return policy_gradient_loss(
        mb.pg_logprobs_B_T, mb.batch.sampler_logprobs_B_T, advantages_B_T, mb.loss_mask_B_T,
        is_mode=s.is_mode, eps_low=s.eps_low, eps_high=s.eps_high, adv_clip=s.adv_clip,
        loss_normalizer=mb.total_tokens,
    )


def grpo_step(mb: MicroBatch, cfg: PolicyConfig) -> tuple[torch.Tensor, dict[str, float], Kept]:
    assert mb.grpo_B_T is not None
    loss, metrics = pg_loss(mb, cfg, mb.grpo_B_T)
    return loss, metrics, {}


def sampled_step(mb: MicroBatch, cfg: PolicyConfig) -> tuple[torch.Tensor, dict[str, float], Kept]:
    """MOPD with the sampled-token advantage; with `surprise_alpha`, each token's advantage is scaled by
    w_t = 1 + a * (1 - sg[pi_S(y_t)]) (arXiv:2608.25643) before advantage clipping, so |w_t A_t| <= adv_clip."""
    d, teachers = cfg.distill, cfg.teachers
    assert d is not None and teachers is not None and mb.names_B is not None
    kept = {"teacher_lp_B_T": teachers.sampled_logprobs(mb.batch, mb.names_B)}
    # the batch-wide metrics come from `batch_metrics` over all micro-batches, not from this part's
    kept["opd_B_T"], _ = mopd_advantages(
        kept["teacher_lp_B_T"], mb.logprobs_B_T.detach(), mb.batch.completion_mask_B_T, mb.names_B
    )
    advantages_B_T = combine_advantages(kept["opd_B_T"], mb.grpo_B_T, d.alpha) if d.alpha > 0 else kept["opd_B_T"]
    if d.surprise_alpha > 0:
        kept["surprise_B_T"] = surprise_weights(mb.logprobs_B_T, d.surprise_alpha)
        advantages_B_T = advantages_B_T * kept["surprise_B_T"]
    loss, metrics = pg_loss(mb, cfg, advantages_B_T)
    return loss, metrics, kept


DistributionLoss = Callable[..., tuple[torch.Tensor, dict[str, float]]]


def distribution_step(loss_fn: DistributionLoss, *, topk: bool = False):
    """An objective whose loss compares the student's and the routed teacher's distributions at every
    completion position (plus alpha * GRPO through the policy-gradient loss).

    Logits at position t-1 predict token t, so student logits [:, :-1] pair with the aligned teacher
    distributions under the loss mask [:, 1:]. The student's logits cover only the last K positions: they start
    at column `off` of the batch, so the teacher is asked for the completion window only (`window` columns).
    The teacher's log pi_T of each sampled token (for the diagnostics) comes from the distributions the loss
    already needed, so it costs no extra teacher pass.
    """

    def step(mb: MicroBatch, cfg: PolicyConfig) -> tuple[torch.Tensor, dict[str, float], Kept]:
        d, teachers, batch = cfg.distill, cfg.teachers, mb.batch
        assert d is not None and teachers is not None and mb.names_B is not None
        off = batch.input_ids_B_T.shape[1] - mb.logits_B_K_V.shape[1]
        window = mb.logits_B_K_V.shape[1] - 1
        student_B_W_V = mb.logits_B_K_V[:, :-1]
        mask_B_W = mb.loss_mask_B_T[:, off + 1 :]
        if topk:
            top_lp, top_ids, teacher_lp_B_T = teachers.topk(batch, mb.names_B, d.topk, window)
            loss, metrics = loss_fn(student_B_W_V, top_lp, top_ids, mask_B_W)
        else:
            teacher_B_W_V = teachers.full_logits(batch, mb.names_B, window)
            lp_B_W = aligned_token_logprobs(teacher_B_W_V, batch.input_ids_B_T[:, off + 1 :])
            teacher_lp_B_T = torch.cat([lp_B_W.new_zeros(batch.size, off + 1), lp_B_W], dim=1)
            teacher_lp_B_T = teacher_lp_B_T * batch.completion_mask_B_T
            loss, metrics = loss_fn(student_B_W_V, teacher_B_W_V, mask_B_W, d)
        loss = loss * mb.share  # a token mean over this micro-batch -> its share of the whole step's
        if d.alpha > 0:
            assert mb.grpo_B_T is not None
            pg, pg_metrics = pg_loss(mb, cfg, d.alpha * mb.grpo_B_T)
            loss = loss + pg
            metrics.update(pg_metrics)
        return loss, metrics, {"teacher_lp_B_T": teacher_lp_B_T}

    return step


def sampled_metrics(kept: Kept, mask_B_T: torch.Tensor, names_B: list[str] | None) -> dict[str, float]:
    """Per-teacher reverse KL and routing share (`mopd_metrics`), teacher NLL, and the mean surprise weight."""
    assert names_B is not None
    metrics = mopd_metrics(kept["opd_B_T"], mask_B_T, names_B)
    metrics.update(teacher_diagnostics(kept["teacher_lp_B_T"], mask_B_T, names_B))
    if "surprise_B_T" in kept:
        metrics["surprise/weight_mean"] = float(masked_mean(kept["surprise_B_T"], mask_B_T))
    return metrics


def distribution_metrics(kept: Kept, mask_B_T: torch.Tensor, names_B: list[str] | None) -> dict[str, float]:
    """Per-teacher routing share, teacher NLL and the sampled-token reverse-KL estimate."""
    assert names_B is not None
    return teacher_diagnostics(kept["teacher_lp_B_T"], mask_B_T, names_B, kept["logprobs_B_T"])


@dataclass(frozen=True)
class Objective:
    step: Callable[[MicroBatch, PolicyConfig], tuple[torch.Tensor, dict[str, float], Kept]]
    batch_metrics: Callable[[Kept, torch.Tensor, list[str] | None], dict[str, float]] | None = None
    uses_grpo: bool = False  # needs GRPO advantages even without `alpha` (pure GRPO)


OBJECTIVES: dict[str, Objective] = {
    "grpo": Objective(grpo_step, uses_grpo=True),
    "sampled": Objective(sampled_step, sampled_metrics),
    "topk": Objective(distribution_step(topk_reverse_kl_loss, topk=True), distribution_metrics),
    "full_reverse_kl": Objective(distribution_step(lambda s, t, m, d: full_reverse_kl_loss(s, t, m)),
                                 distribution_metrics),
    "forward_kl": Objective(distribution_step(lambda s, t, m, d: forward_kl_loss(s, t, m)), distribution_metrics),
    "jsd": Objective(distribution_step(lambda s, t, m, d: generalized_jsd_loss(s, t, m, d.jsd_beta)),
                     distribution_metrics),
}
