"""One learner step for every stage kind: the phases of the one loop, in order.

    supervised (pretrain, sft):  batch from data ─► token NLL
    policy (rlvr, mopd):         sample ─► reward ─► teacher scores ─► advantages ─► PG loss

An algorithm is an advantage estimator plugged into `policy_loss`; there is no trainer per algorithm.
Each function returns `(loss, metrics)`; the caller owns the optimizer and logging, and backward too unless the
step is split into micro-batches (`micro_batch_size`): then each micro-batch's loss is backpropagated as soon as
it is computed, so only one micro-batch's activations are alive at a time, and the returned loss is detached
(the gradient is already in the parameters' `.grad`). The loss is a token mean over the whole step, so each
micro-batch's share is scaled by its token count: the accumulated gradient is the whole batch's, up to float
rounding (`tests/test_micro_batches.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..envs import Problem, get_domain
from ..models.forward import sequence_logits
from ..models.prompting import prompt_token_ids
from ..sampling.sampler import sample
from ..teachers.panel import TeacherPanel, aligned_token_logprobs
from .advantages import combine_advantages, grpo_advantages, mopd_metrics, opd_advantages
from .diagnostics import teacher_diagnostics
from .filters import solved_group_filter
from .logprobs import masked_mean, token_entropy, token_logprobs
from .losses import policy_gradient_loss, sft_nll_loss, surprise_weights
from .objectives import forward_kl_loss, full_reverse_kl_loss, generalized_jsd_loss, topk_reverse_kl_loss


def supervised_batch(tokenizer, problems: list[Problem], *, loss_on_prompt: bool):
    """`prompt answer [EOS]`, left-padded like the sampler's rows; targets are the answer and EOS
    (and the prompt too when `loss_on_prompt`, which is what pretraining on a corpus means). The prompt is
    rendered by `prompt_token_ids`, the sampler's own function (`[BOS] prompt`, or the chat template)."""
    rows, targets = [], []
    for p in problems:
        prompt = prompt_token_ids(tokenizer, p.prompt)
        answer = [*tokenizer(p.answer, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        rows.append(prompt + answer)
        targets.append([0] + [int(loss_on_prompt)] * (len(prompt) - 1) + [1] * len(answer))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width))
    for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
        ids[i, width - len(r) :] = torch.tensor(r)
        attn[i, width - len(r) :] = 1
        target[i, width - len(r) :] = torch.tensor(t, dtype=torch.float)
    return ids, attn, target


def micro_batches(rows: int, size: int | None) -> list[slice]:
    """Row slices of at most `size` rows covering `rows` (one slice of everything when `size` is None)."""
    size = size or max(rows, 1)
    return [slice(i, min(i + size, rows)) for i in range(0, rows, size)] or [slice(0, 0)]


def backward_outside_autocast(loss: torch.Tensor) -> None:
    """`loss.backward()` with autocast off, as `stages/train.py` runs a whole batch's backward: a micro-batch's
    backward happens inside the step's forward context, and backward ops must not be re-cast."""
    with torch.autocast(device_type=loss.device.type, enabled=False):
        loss.backward()


def accumulate(loss: torch.Tensor, part: torch.Tensor, micro_batched: bool) -> torch.Tensor:
    """The step's loss so far plus one micro-batch's part. Without micro-batches the part is the loss (the caller
    runs backward); with them, the part's backward runs now and only its value is kept."""
    if not micro_batched:
        return part
    if part.requires_grad:
        backward_outside_autocast(part)
    return loss + part.detach()


def _share(tokens: float, total: float) -> float:
    """A micro-batch's share of a token mean over the whole step (1.0 for the whole batch itself)."""
    return tokens / total if total > 0 else 0.0


def supervised_loss(model, tokenizer, problems: list[Problem], *, loss_on_prompt: bool,
                    micro_batch_size: int | None = None):
    dev = next(model.parameters()).device
    ids_B_T, attn_B_T, target_B_T = (
        x.to(dev) for x in supervised_batch(tokenizer, problems, loss_on_prompt=loss_on_prompt)
    )
    chunks = micro_batches(len(problems), micro_batch_size)
    total = float(target_B_T.sum())
    loss = torch.zeros((), device=dev)
    for rows in chunks:
        logprobs_b_T = token_logprobs(sequence_logits(model, ids_B_T[rows], attn_B_T[rows]), ids_B_T[rows])
        part, _ = sft_nll_loss(logprobs_b_T, target_B_T[rows])
        loss = accumulate(loss, part * _share(float(target_B_T[rows].sum()), total), len(chunks) > 1)
    return loss, {"loss": float(loss.detach()), "sft/nll": float(loss.detach()), "sft/num_tokens": total}


@dataclass(frozen=True)
class PolicySettings:
    """What `policy_loss` needs from a stage's settings (rlvr or mopd)."""

    group_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    is_mode: str
    eps_low: float
    eps_high: float
    adv_clip: float | None
    alpha: float  # weight of A_GRPO; with no teachers (rlvr) the GRPO advantage is used alone
    objective: str = "sampled"  # sampled | topk | full_reverse_kl | forward_kl | jsd (mopd only)
    topk: int = 16
    jsd_beta: float = 0.5
    surprise_alpha: float = 0.0  # sampled objective: A_t * (1 + a * (1 - sg[pi_S(y_t)]))
    filter_solved: bool = False  # drop groups whose pass rate is 0 or 1 from the loss
    micro_batch_size: int | None = None  # rollouts per forward/backward pass; None = the whole batch at once


def distillation_loss(
    student_logits_B_T_V, batch, names_B, panel: TeacherPanel, settings: PolicySettings, loss_mask_B_T
):
    """A supervised loss over teacher distributions on the student's own rollouts (non-sampled objectives).

    Logits at position t-1 predict token t, so student logits [:, :-1] pair with the aligned teacher
    distributions [:, 1:] under the loss mask [:, 1:].

    Returns:
        (loss, metrics, teacher_logprobs_B_T): the last is log pi_T of each sampled token (for diagnostics),
        taken from the distributions the loss already needed, so it costs no extra teacher pass.
    """
    # The student's logits may cover only the last K positions (`policy_loss` skips the prompt): they start at
    # column `off` of the batch, so the teacher columns and mask they pair with start at off + 1, and the teacher
    # is asked for those columns only.
    off = batch.input_ids_B_T.shape[1] - student_logits_B_T_V.shape[1]
    window = student_logits_B_T_V.shape[1] - 1
    student_B_T_V = student_logits_B_T_V[:, :-1]
    mask_B_T = loss_mask_B_T[:, off + 1 :]
    if settings.objective == "topk":
        top_lp, top_ids, teacher_lp_B_T = panel.topk(batch, names_B, settings.topk, window)
        loss, metrics = topk_reverse_kl_loss(student_B_T_V, top_lp, top_ids, mask_B_T)
        return loss, metrics, teacher_lp_B_T
    teacher_B_T_V = panel.full_logits(batch, names_B, window)
    lp_B_W = aligned_token_logprobs(teacher_B_T_V, batch.input_ids_B_T[:, off + 1 :])
    teacher_lp_B_T = torch.cat([lp_B_W.new_zeros(batch.size, off + 1), lp_B_W], dim=1) * batch.completion_mask_B_T
    if settings.objective == "full_reverse_kl":
        loss, metrics = full_reverse_kl_loss(student_B_T_V, teacher_B_T_V, mask_B_T)
    elif settings.objective == "forward_kl":
        loss, metrics = forward_kl_loss(student_B_T_V, teacher_B_T_V, mask_B_T)
    elif settings.objective == "jsd":
        loss, metrics = generalized_jsd_loss(student_B_T_V, teacher_B_T_V, mask_B_T, settings.jsd_beta)
    else:
        raise ValueError(f"unknown distillation objective {settings.objective!r}")
    return loss, metrics, teacher_lp_B_T


def policy_loss(
    model,
    tokenizer,
    problems: list[Problem],
    settings: PolicySettings,
    generator: torch.Generator,
    panel: TeacherPanel | None = None,
    sampler=sample,  # `sampling.sampler.sample` or a drop-in with its signature (the vLLM backend)
):
    """Sample G completions per problem, score them, and return the policy-gradient loss.

    rlvr (panel is None): A = A_GRPO.  mopd: A = A_MOPD + alpha * A_GRPO, each A_MOPD token scaled by the
    surprise weight 1 + surprise_alpha * (1 - sg[pi_S(y_t)]) when set. With `filter_solved`, rows of groups whose
    pass rate is 0 or 1 leave every loss term. Every mopd objective logs per-teacher routing share and teacher NLL.
    Phases 1, 2 and the batch-wide part of 4 (filter, GRPO's group statistics, routing) see the whole batch;
    phases 3-5 run per micro-batch of rows (`settings.micro_batch_size`, module docstring); metrics are computed
    over the whole batch either way.
    """
    # 1. sample: G rows per prompt, sharing a group id
    G = settings.group_size
    rows = [p for p in problems for _ in range(G)]
    batch = sampler(
        model,
        tokenizer,
        [p.prompt for p in rows],
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        generator=generator,
        domains=[p.domain for p in rows],
        group_ids=[i // G for i in range(len(rows))],
        references=[p.answer for p in rows],
    )
    mask_B_T = batch.completion_mask_B_T

    # 2. reward: each row's domain verifier
    rewards_B = torch.tensor(
        [get_domain(p.domain).verify(p, c) for p, c in zip(rows, batch.completions, strict=True)],
        device=mask_B_T.device,
    )
    batch = batch.with_rewards(rewards_B)
    metrics: dict[str, float] = {
        "reward/mean": float(rewards_B.mean()),
        "completion_len": float(mask_B_T.sum(-1).mean()),
    }
    for d in sorted(set(batch.domains)):
        sel = torch.tensor([x == d for x in batch.domains], device=rewards_B.device)
        metrics[f"reward/{d}"] = float(rewards_B[sel].mean())
    metrics["sampling/temperature"] = settings.temperature

    # 4a. the batch-wide part of the advantages: GRPO from rewards (group statistics), the routed teachers.
    # Difficulty filtering first: rows of all-solved / none-solved groups leave every loss below.
    loss_mask_B_T = mask_B_T
    if settings.filter_solved:
        if G < 2:
            raise ValueError("filter_solved needs group_size >= 2 (a pass rate of one rollout is 0 or 1)")
        solved_keep_B, filter_metrics = solved_group_filter(rewards_B, batch.group_ids_B)
        metrics.update(filter_metrics)
        loss_mask_B_T = mask_B_T * solved_keep_B[:, None].float()
    grpo_B_T = None
    if panel is None or settings.alpha > 0:
        grpo_B_T, keep_B, grpo_metrics = grpo_advantages(rewards_B, batch.group_ids_B, mask_B_T)
        metrics.update(grpo_metrics)
        if panel is None:
            loss_mask_B_T = loss_mask_B_T * keep_B[:, None].float()
    names_B = panel.route(batch) if panel is not None else None

    # 3-5 per micro-batch; the loss is a token mean over the whole step's loss mask. Logits only for the K
    # positions that predict a completion token (from the column before the first completion column): the
    # prompt's [B, P, V] projection, and its saved activations for backward, would be computed only to be thrown
    # away.
    T = mask_B_T.shape[1]
    K = T - int(mask_B_T.any(0).long().argmax()) + 1
    total = float(loss_mask_B_T.sum())
    chunks = micro_batches(batch.size, settings.micro_batch_size)
    loss = torch.zeros((), device=mask_B_T.device)
    loss_metrics: dict[str, float] = {}
    parts: list[dict[str, torch.Tensor]] = []
    for r in chunks:
        whole = r.start == 0 and r.stop == batch.size
        share = _share(float(loss_mask_B_T[r].sum()), total)
        part_loss, part_metrics, part = _micro_batch_loss(
            model, batch if whole else batch.select(torch.arange(r.start, r.stop)), loss_mask_B_T[r],
            None if grpo_B_T is None else grpo_B_T[r], None if names_B is None else names_B[r], panel, settings,
            K, total, share,
        )
        for k, v in part_metrics.items():  # each is a token mean over the micro-batch's loss mask
            loss_metrics[k] = loss_metrics.get(k, 0.0) + share * v
        loss = accumulate(loss, part_loss, len(chunks) > 1)
        parts.append(part)
    whole_B = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    # metrics over the whole batch, from what each micro-batch kept (detached)
    metrics["entropy"] = float(masked_mean(whole_B["entropy_B_K"], mask_B_T[:, T - K :]))
    if panel is not None:
        assert names_B is not None
        if settings.objective == "sampled":
            metrics.update(mopd_metrics(whole_B["opd_B_T"], mask_B_T, names_B))
            metrics.update(teacher_diagnostics(whole_B["teacher_lp_B_T"], mask_B_T, names_B))
        else:
            metrics.update(teacher_diagnostics(whole_B["teacher_lp_B_T"], mask_B_T, names_B, whole_B["logprobs_B_T"]))
        if "surprise_B_T" in whole_B:
            metrics["surprise/weight_mean"] = float(masked_mean(whole_B["surprise_B_T"], mask_B_T))
    metrics.update(loss_metrics)
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def _micro_batch_loss(
    model, batch, loss_mask_B_T, grpo_B_T, names_B, panel: TeacherPanel | None, settings: PolicySettings,
    K: int, total_tokens: float, share: float,
) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """Phases 3-5 of `policy_loss` on some rows of the batch (all of them without micro-batches); the student's
    logits cover the last K positions.

    Returns (loss, loss metrics, kept): the loss is this micro-batch's `share` of the whole step's token mean
    over `total_tokens` loss-mask tokens; its metrics are token means over this micro-batch's loss mask (the caller
    weights them by their token share); `kept` holds the detached per-token tensors the whole-batch metrics read.
    """
    mask_B_T = batch.completion_mask_B_T

    # 3. current-policy logprobs (with grad) on the sampled rows
    T = batch.input_ids_B_T.shape[1]
    logits_B_K_V = sequence_logits(model, batch.input_ids_B_T, batch.attention_mask_B_T, logits_to_keep=K)
    logprobs_B_K = token_logprobs(logits_B_K_V, batch.input_ids_B_T[:, T - K :])
    logprobs_B_T = torch.cat([logprobs_B_K.new_zeros(logprobs_B_K.shape[0], T - K), logprobs_B_K], dim=1)
    # The importance ratio compares the policy with the distribution the tokens were drawn from, so at a sampling
    # temperature != 1 the policy-gradient term uses the tempered policy (as the sampler recorded it); the OPD
    # advantage and the diagnostics keep the model's own distribution, which is what is distilled.
    pg_logprobs_B_T = logprobs_B_T
    if settings.temperature != 1.0:
        tempered_B_K = token_logprobs(logits_B_K_V / settings.temperature, batch.input_ids_B_T[:, T - K :])
        pg_logprobs_B_T = torch.cat([tempered_B_K.new_zeros(tempered_B_K.shape[0], T - K), tempered_B_K], dim=1)
    kept = {"entropy_B_K": token_entropy(logits_B_K_V.detach()), "logprobs_B_T": logprobs_B_T.detach()}

    def pg_loss(advantages_B_T):
        return policy_gradient_loss(
            pg_logprobs_B_T, batch.sampler_logprobs_B_T, advantages_B_T, loss_mask_B_T,
            is_mode=settings.is_mode, eps_low=settings.eps_low, eps_high=settings.eps_high,  # type: ignore[arg-type]
            adv_clip=settings.adv_clip, loss_normalizer=total_tokens,
        )

    # 4b. the per-row part of the advantages: the routed teachers' scores of these rows
    advantages_B_T = grpo_B_T
    metrics: dict[str, float] = {}
    if panel is not None:
        assert names_B is not None
        if settings.objective != "sampled":
            # full-distribution objectives: their own loss, plus the optional GRPO term through the PG loss
            loss, metrics, kept["teacher_lp_B_T"] = distillation_loss(
                logits_B_K_V, batch, names_B, panel, settings, loss_mask_B_T
            )
            loss = loss * share  # a token mean over this micro-batch -> its share of the whole step's
            if settings.alpha > 0:
                pg, pg_metrics = pg_loss(settings.alpha * grpo_B_T)
                loss = loss + pg
                metrics.update(pg_metrics)
            return loss, metrics, kept
        kept["teacher_lp_B_T"] = panel.sampled_logprobs(batch, names_B)
        kept["opd_B_T"], _ = opd_advantages(kept["teacher_lp_B_T"], logprobs_B_T.detach(), mask_B_T)
        advantages_B_T = (
            combine_advantages(kept["opd_B_T"], grpo_B_T, settings.alpha) if settings.alpha > 0 else kept["opd_B_T"]
        )
        if settings.surprise_alpha > 0:
            # token reweighting by student surprise (arXiv:2608.25643): w_t = 1 + a * (1 - sg[pi_S(y_t)]),
            # applied before advantage clipping, so |w_t A_t| <= adv_clip still holds in the loss
            kept["surprise_B_T"] = surprise_weights(logprobs_B_T, settings.surprise_alpha)
            advantages_B_T = advantages_B_T * kept["surprise_B_T"]

    # 5. loss: one policy-gradient loss with truncated importance weights and advantage clipping
    loss, metrics = pg_loss(advantages_B_T)
    return loss, metrics, kept
