"""The policy step of every sampling stage (rlvr, mix_rl, cascade_rl, mopd), after `rollout.rollout`:

    rewarded batch ─► batch-wide advantages (filter, GRPO groups, routing)
                  ─► per micro-batch: student scores ─► objective (teacher scores, advantages, loss)
                  ─► whole-batch metrics

An algorithm is an entry of `objective_table.OBJECTIVES`; there is no trainer per algorithm. Returns
`(loss, metrics)`; the caller owns the optimizer and logging, and backward too unless the step is split into
micro-batches (`micro_batches.py`: then the returned loss is detached and the gradient already accumulated).
"""

from __future__ import annotations

import torch

from ..core.batch import RolloutBatch
from ..core.logprobs import masked_mean, token_entropy, token_logprobs
from ..models.forward import sequence_logits
from .advantages import grpo_advantages
from .filters import solved_group_filter
from .micro_batches import accumulate_micro_batches
from .objective_table import OBJECTIVES, MicroBatch, PolicyConfig


def policy_loss(
    model, batch: RolloutBatch, cfg: PolicyConfig, *, temperature: float, micro_batch_size: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of a rewarded batch: A = A_GRPO without teachers; with them, the distillation objective of
    `cfg.distill` (+ alpha * A_GRPO). With `filter_solved`, rows of groups whose pass rate is 0 or 1 leave every
    loss term. The batch-wide parts (filter, GRPO's group statistics, routing) and the metrics see the whole
    batch; the student's forward, the teachers' scores and the loss run per micro-batch of rows."""
    objective = OBJECTIVES["grpo" if cfg.distill is None else cfg.distill.objective]
    mask_B_T = batch.completion_mask_B_T
    loss_mask_B_T, grpo_B_T, metrics = batch_advantages(batch, cfg, objective.uses_grpo)
    names_B = cfg.teachers.route(batch) if cfg.teachers is not None else None
    # logits only for the K positions that predict a completion token (from the column before the first
    # completion column): the prompt's [B, P, V] projection would be computed only to be thrown away
    T = mask_B_T.shape[1]
    K = T - int(mask_B_T.any(0).long().argmax()) + 1
    total = float(loss_mask_B_T.sum())

    def part(rows: slice, share: float):
        whole = rows.start == 0 and rows.stop == batch.size
        mb = student_scores(
            model, batch if whole else batch.select(torch.arange(rows.start, rows.stop)), K, temperature,
            loss_mask_B_T[rows], None if grpo_B_T is None else grpo_B_T[rows],
            None if names_B is None else names_B[rows], share, total,
        )
        loss, part_metrics, kept = objective.step(mb, cfg)
        entropy_B_K = token_entropy(mb.logits_B_K_V.detach())
        return loss, part_metrics, {**kept, "entropy_B_K": entropy_B_K, "logprobs_B_T": mb.logprobs_B_T.detach()}

    loss, loss_metrics, kept = accumulate_micro_batches(part, loss_mask_B_T, micro_batch_size)
    metrics["entropy"] = float(masked_mean(kept["entropy_B_K"], mask_B_T[:, T - K :]))
    if objective.batch_metrics is not None:
        metrics.update(objective.batch_metrics(kept, mask_B_T, names_B))
    metrics.update(loss_metrics)
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def batch_advantages(
    batch: RolloutBatch, cfg: PolicyConfig, pure_grpo: bool
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """The batch-wide part of the advantages: (loss mask, GRPO advantages or None, metrics).

    Difficulty filtering first: rows of all-solved / none-solved groups leave every loss. GRPO's group
    statistics when the objective is GRPO or `alpha` > 0; pure GRPO also drops flat groups from its token mean.
    """
    assert batch.rewards_B is not None, "policy_loss needs a rewarded batch (learner.rollout.rollout)"
    mask_B_T = batch.completion_mask_B_T
    loss_mask_B_T = mask_B_T
    metrics: dict[str, float] = {}
    if cfg.sampling.filter_solved:
        if cfg.sampling.group_size < 2:
            raise ValueError("filter_solved needs group_size >= 2 (a pass rate of one rollout is 0 or 1)")
        solved_keep_B, filter_metrics = solved_group_filter(batch.rewards_B, batch.group_ids_B)
        metrics.update(filter_metrics)
        loss_mask_B_T = mask_B_T * solved_keep_B[:, None].float()
    grpo_B_T = None
    if pure_grpo or (cfg.distill is not None and cfg.distill.alpha > 0):
        grpo_B_T, keep_B, grpo_metrics = grpo_advantages(batch.rewards_B, batch.group_ids_B, mask_B_T)
        metrics.update(grpo_metrics)
        if pure_grpo:
            loss_mask_B_T = loss_mask_B_T * keep_B[:, None].float()
    return loss_mask_B_T, grpo_B_T, metrics


def student_scores(
    model, batch: RolloutBatch, K: int, temperature: float, loss_mask_B_T: torch.Tensor,
    grpo_B_T: torch.Tensor | None, names_B: list[str] | None, share: float, total_tokens: float,
) -> MicroBatch:
    """The student's forward pass (with grad) over the last K positions of `batch`'s rows.

    The importance ratio compares the policy with the distribution the tokens were drawn from, so at a sampling
    temperature != 1 the policy-gradient term uses the tempered policy (as the sampler recorded it); the OPD
    advantage and the diagnostics keep the model's own distribution, which is what is distilled.
    """
    T = batch.input_ids_B_T.shape[1]
    logits_B_K_V = sequence_logits(model, batch.input_ids_B_T, batch.attention_mask_B_T, logits_to_keep=K)
    logprobs_B_T = _pad_to(token_logprobs(logits_B_K_V, batch.input_ids_B_T[:, T - K :]), T)
    pg_logprobs_B_T = logprobs_B_T
    if temperature != 1.0:
        pg_logprobs_B_T = _pad_to(token_logprobs(logits_B_K_V / temperature, batch.input_ids_B_T[:, T - K :]), T)
    return MicroBatch(batch=batch, loss_mask_B_T=loss_mask_B_T, logits_B_K_V=logits_B_K_V, logprobs_B_T=logprobs_B_T,
                      pg_logprobs_B_T=pg_logprobs_B_T, grpo_B_T=grpo_B_T, names_B=names_B, share=share,
                      total_tokens=total_tokens)


def _pad_to(x_B_K: torch.Tensor, T: int) -> torch.Tensor:
    """[B, K] values of the last K positions -> [B, T] aligned to input_ids (zeros in front)."""
    return torch.cat([x_B_K.new_zeros(x_B_K.shape[0], T - x_B_K.shape[1]), x_B_K], dim=1)
