"""The policy step of every sampling stage (rlvr, mix_rl, cascade_rl, mopd), after `rollout.rollout`:

    rewarded batch ─► batch-wide advantages (filter, GRPO groups, routing)
                  ─► per micro-batch: student scores ─► objective (teacher scores, advantages, loss)
                  ─► whole-batch metrics

An algorithm is an entry of `objective_table.OBJECTIVES`; there is no trainer per algorithm. Returns
`(loss, metrics)`; the caller owns the optimizer and logging, and backward too unless the step is split into
micro-batches (`micro_batches.py`: then the returned loss is detached and the gradient already accumulated).
The student's logits are never held whole: its per-token scores (and a distribution objective's loss terms)
come from its final hidden states a block of `logit_chunk` positions at a time (`chunked.py`).
"""

from __future__ import annotations

import torch

from ..core.batch import RolloutBatch
from ..core.logprobs import masked_mean
from ..core.scoring import LogitBlocks
from ..models.forward import final_hidden, split_head
from .advantages import grpo_advantages
from .chunked import BlockTerms, pad_front, token_scores
from .data_parallel import DataParallel
from .filters import solved_group_filter
from .fused_head import fusable, fused_kl_scores
from .micro_batches import accumulate_micro_batches
from .objective_table import OBJECTIVES, MicroBatch, PolicyConfig
from .reward_only import route_rows


def policy_loss(
    model, batch: RolloutBatch, cfg: PolicyConfig, *, temperature: float, micro_batch_size: int | None = None,
    logit_chunk: int | None = None, dp: DataParallel | None = None, by_length: bool = False,
    vocab_block: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of a rewarded batch: A = A_GRPO without teachers; with them, the distillation objective of
    `cfg.distill` (+ alpha * A_GRPO). With `filter_solved`, rows of groups whose pass rate is 0 or 1 leave every
    loss term. The batch-wide parts (filter, GRPO's group statistics, routing) and the metrics see the whole
    batch; the student's forward, the teachers' scores and the loss run per micro-batch of rows, and within one
    a block of `logit_chunk` positions at a time (None: every position in one block). With `vocab_block`, an
    objective that needs only the sampled tokens' scores (`sampled`, `grpo`) takes them over all of a
    micro-batch's positions at once, that many vocabulary columns at a time (`core.vocab_blocks`).

    `by_length` (`micro_batch_by_length`): micro-batches take the rows longest first, and each one runs (student
    and teachers) over its own columns only, without the columns that are padding in all its rows; the same loss
    and gradient up to float rounding, without the decoder's work on most of the padding."""
    objective = OBJECTIVES["grpo" if cfg.distill is None else cfg.distill.objective]
    mask_B_T = batch.completion_mask_B_T
    loss_mask_B_T, grpo_B_T, metrics = batch_advantages(batch, cfg, objective.uses_grpo)
    names_B = route_rows(cfg.teachers, batch, cfg.reward_only) if cfg.teachers is not None else None
    # logits only for the K positions that predict a completion token (from the column before the first
    # completion column): the prompt's [B, P, V] projection would be computed only to be thrown away
    T = mask_B_T.shape[1]
    K = T - batch.first_completion_column + 1
    total = float(loss_mask_B_T.sum())
    # a KL that is the whole loss, over several blocks of a plain head: its gradient made in the forward (not
    # with a teacher of another tokenizer, whose distributions are restricted: `objective_table.restrict_to_shared`)
    kind = objective.fused_head if grpo_B_T is None else None
    fused = (kind is not None and torch.is_grad_enabled()
             and fusable((split_head(model) or (None, None))[1], K, logit_chunk)
             and not getattr(cfg.teachers, "reads_other_tokens", False))  # known without reading the batch

    def part(rows: slice | torch.Tensor, share: float):
        idx = torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        whole = idx.numel() == batch.size and bool((idx == torch.arange(batch.size)).all())
        part_batch = batch if whole else batch.select(idx)
        part_names = None if names_B is None else [names_B[i] for i in idx.tolist()]
        part_loss_mask, part_grpo = loss_mask_B_T[idx], None if grpo_B_T is None else grpo_B_T[idx]
        lead, trail = 0, 0
        if by_length:  # this micro-batch's own columns: the ones where some row has a real token
            start, stop = part_batch.real_columns()
            lead, trail = min(start, T - K), min(T - stop, K - 1)  # the window's first column is a prompt's last
            if lead or trail:
                part_batch = part_batch.columns(lead, T - trail)
                part_loss_mask = part_loss_mask[:, lead : T - trail]
                part_grpo = None if part_grpo is None else part_grpo[:, lead : T - trail]
        k = K - trail
        terms, fused_kl = None, None
        if fused:
            assert cfg.teachers is not None and part_names is not None and kind is not None
            fused_kl = (kind, cfg.teachers.logit_blocks(part_batch, part_names, k))
        elif objective.block_terms is not None:
            terms = objective.block_terms(part_batch, part_names, k, cfg)
        mb = student_scores(model, part_batch, k, temperature, part_loss_mask, part_grpo, part_names, share, total,
                            terms=terms, logit_chunk=logit_chunk, fused_kl=fused_kl, vocab_block=vocab_block)
        loss, part_metrics, kept = objective.step(mb, cfg)
        kept = {**kept, "entropy_B_K": mb.entropy_B_T[:, -k:], "logprobs_B_T": mb.logprobs_B_T.detach()}
        return loss, part_metrics, repad(kept, lead, trail)

    order = None
    if by_length and micro_batch_size is not None:  # longest first: the largest micro-batch fails first, if any
        order = torch.argsort(batch.attention_mask_B_T.sum(1).cpu(), descending=True, stable=True)
    loss, loss_metrics, kept = accumulate_micro_batches(part, loss_mask_B_T, micro_batch_size, dp, order)
    metrics["entropy"] = float(masked_mean(kept["entropy_B_K"], mask_B_T[:, T - K :]))
    if objective.batch_metrics is not None:
        metrics.update(objective.batch_metrics(kept, mask_B_T, names_B))
    metrics.update(loss_metrics)
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def repad(kept: dict[str, torch.Tensor], lead: int, trail: int) -> dict[str, torch.Tensor]:
    """A trimmed micro-batch's kept tensors back in the whole batch's columns (zeros where its rows had only
    padding): `*_B_T` lost `lead` columns in front and `trail` behind, `*_B_K` (the last K positions) `trail`."""
    if not lead and not trail:
        return kept
    out = {}
    for name, t in kept.items():
        if name.endswith("_B_T"):
            out[name] = torch.nn.functional.pad(t, (lead, trail))
        elif name.endswith("_B_K"):
            out[name] = torch.nn.functional.pad(t, (0, trail))
        else:
            raise ValueError(f"kept tensor {name!r}: its layout (_B_T or _B_K) says how to re-pad it")
    return out


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
    if pure_grpo or (cfg.distill is not None and cfg.distill.alpha > 0) or cfg.reward_only:
        grpo_B_T, keep_B, grpo_metrics = grpo_advantages(batch.rewards_B, batch.group_ids_B, mask_B_T)
        metrics.update(grpo_metrics)
        if pure_grpo:
            loss_mask_B_T = loss_mask_B_T * keep_B[:, None].float()
    return loss_mask_B_T, grpo_B_T, metrics


def student_scores(
    model, batch: RolloutBatch, K: int, temperature: float, loss_mask_B_T: torch.Tensor,
    grpo_B_T: torch.Tensor | None, names_B: list[str] | None, share: float, total_tokens: float, *,
    terms: BlockTerms | None = None, logit_chunk: int | None = None,
    fused_kl: tuple[str, LogitBlocks] | None = None, vocab_block: int | None = None,
) -> MicroBatch:
    """The student's forward pass (with grad) over the last K positions of `batch`'s rows, scored per token a
    block of `logit_chunk` positions at a time, with the objective's loss `terms` from the same blocks; or, with
    `fused_kl` (the KL's kind and the routed teacher's blocks), a KL that is the whole loss with its gradient
    made in the forward (`fused_head`), each token weighing its loss-mask entry over the micro-batch's mask count,
    as the objective's token mean does.

    The importance ratio compares the policy with the distribution the tokens were drawn from, so at a sampling
    temperature != 1 the policy-gradient term uses the tempered policy (as the sampler recorded it); the OPD
    advantage and the diagnostics keep the model's own distribution, which is what is distilled.
    """
    T = batch.input_ids_B_T.shape[1]
    hidden_B_K_H, head = final_hidden(model, batch.input_ids_B_T, batch.attention_mask_B_T, keep=K)
    targets_B_W = batch.input_ids_B_T[:, T - K + 1 :]
    live_B_W = batch.completion_mask_B_T[:, T - K + 1 :] > 0
    if fused_kl is None:
        scores = token_scores(hidden_B_K_H, head, targets_B_W, logit_chunk, temperature=temperature, entropy=True,
                              terms=terms, live_B_W=live_B_W, vocab_block=vocab_block)
    else:
        assert logit_chunk is not None
        mask_B_W = loss_mask_B_T[:, T - K + 1 :].to(hidden_B_K_H.dtype)
        weights_B_W = mask_B_W / mask_B_W.sum().clamp(min=torch.finfo(mask_B_W.dtype).tiny)
        scores = fused_kl_scores(hidden_B_K_H, head, targets_B_W, live_B_W, weights_B_W, logit_chunk,
                                 fused_kl[1], fused_kl[0], temperature)
    logprobs_B_T = pad_front(scores.pop("logprobs"), T)
    pg_logprobs_B_T = pad_front(scores.pop("pg_logprobs"), T) if temperature != 1.0 else logprobs_B_T
    entropy_B_T = pad_front(scores.pop("entropy"), T)
    return MicroBatch(batch=batch, loss_mask_B_T=loss_mask_B_T, logprobs_B_T=logprobs_B_T,
                      pg_logprobs_B_T=pg_logprobs_B_T, entropy_B_T=entropy_B_T, terms_B_W=scores, grpo_B_T=grpo_B_T,
                      names_B=names_B, share=share, total_tokens=total_tokens)
