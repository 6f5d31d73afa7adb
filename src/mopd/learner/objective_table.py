"""The objective table: what a policy step optimises, by name. A new objective is one entry here.

Each entry turns one micro-batch of the student's scored rollouts (`MicroBatch`) into its share of the step's
loss, and the kept per-token tensors into whole-batch metrics:

    grpo             A = A_GRPO                       (rlvr, mix_rl, cascade_rl: no teachers)
    sampled          A = A_MOPD (+ alpha * A_GRPO)    per-token reverse-KL advantage of the sampled token
                                                      (`advantages.opd_advantages` of the routed
                                                      teacher's scores), optional surprise weights
    topk             top-k reverse KL over the teacher's support (+ alpha * GRPO through the PG loss)
    full_reverse_kl  KL(pi_S || pi_T) over the full vocabulary (+ alpha * GRPO)
    forward_kl       KL(pi_T || pi_S) (+ alpha * GRPO)
    jsd              generalized JSD of GKD with `jsd_beta` (+ alpha * GRPO)

Advantage objectives feed the one policy-gradient loss (`losses.policy_gradient_loss`); distribution objectives
have a loss of their own over the teacher's distributions at every completion position. Their per-token loss
terms are computed where the student's logits are, one block of positions at a time (`block_terms`, run by
`chunked.token_scores`), from the routed teacher's logits of the same block (`TeacherScorer.logit_blocks`) or its
top-k; the step then takes the token mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.batch import RolloutBatch
from ..core.logprobs import aligned_token_logprobs, masked_mean, upcast
from ..core.position_blocks import row_slice
from ..core.schema import DistillationSettings, SamplingSettings
from ..core.scoring import TeacherScorer
from .advantages import chunk_advantages, combine_advantages, mopd_metrics, opd_advantages
from .chunked import BlockTerms, Scores, pad_front
from .diagnostics import teacher_diagnostics
from .fused_kl import forward_kl_and_teacher_lse, reverse_kl_and_teacher_lse
from .losses import policy_gradient_loss, surprise_weights
from .objectives import forward_kl_tokens, jsd_tokens, reverse_kl_tokens, topk_metrics, topk_reverse_kl_tokens
from .reward_only import chunk_layout, scored_rows, teacher_rows, with_reward_only_rows

Kept = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MicroBatch:
    """Some rows of a step's rewarded batch with the student's scores of them (all rows without micro-batches).

    Student tensors are aligned to input_ids, or (the objective's block terms) to the last W = K - 1 token
    columns. `share` is this micro-batch's fraction of the step's loss tokens, `total_tokens` the step's count.
    """

    batch: RolloutBatch
    loss_mask_B_T: torch.Tensor  # the completion mask, minus filtered groups (and, for pure GRPO, flat groups)
    logprobs_B_T: torch.Tensor  # log pi_S(y_t) (with grad)
    pg_logprobs_B_T: torch.Tensor  # the same at the sampling temperature: the importance ratio's numerator
    entropy_B_T: torch.Tensor  # the entropy of pi_S at each token (no grad)
    terms_B_W: Scores  # the objective's per-token terms (`Objective.block_terms`) of the last W tokens
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
    reward_only: frozenset[str] = frozenset()  # domains without a teacher: GRPO rows of a MOPD step (reward_only.py)


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
    kept = {"teacher_lp_B_T": scored_rows(teachers.sampled_logprobs, mb.batch, mb.names_B)}
    # the batch-wide metrics come from `batch_metrics` over all micro-batches, not from this part's
    chunks = chunk_layout(teachers, mb.batch, mb.names_B)
    if chunks is None:
        kept["opd_B_T"], _ = opd_advantages(kept["teacher_lp_B_T"], mb.logprobs_B_T.detach(),
                                            mb.batch.completion_mask_B_T)
    else:  # a teacher of another tokenizer: advantages over aligned chunks
        kept["opd_B_T"] = chunk_advantages(kept["teacher_lp_B_T"], mb.logprobs_B_T.detach(),
                                           mb.batch.completion_mask_B_T, chunks)
        kept["chunked_B_T"] = (chunks >= 0).float()
    advantages_B_T = combine_advantages(kept["opd_B_T"], mb.grpo_B_T, d.alpha) if d.alpha > 0 else kept["opd_B_T"]
    if d.surprise_alpha > 0:
        kept["surprise_B_T"] = surprise_weights(mb.logprobs_B_T, d.surprise_alpha)
        advantages_B_T = advantages_B_T * kept["surprise_B_T"]
    advantages_B_T = with_reward_only_rows(advantages_B_T, mb.grpo_B_T, mb.names_B)  # no-op without such rows
    loss, metrics = pg_loss(mb, cfg, advantages_B_T)
    return loss, metrics, kept


TokenLoss = Callable[[torch.Tensor, torch.Tensor, DistillationSettings], torch.Tensor]


FusedLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def restrict_to_shared(student_B_N_V: torch.Tensor,
                       teacher_B_N_V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both next-token distributions restricted to the tokens the teacher shares, for a panel with a teacher of
    another tokenizer (docs/CROSS_TOKENIZER.md): such a teacher's rows are -inf at the student ids it lacks and
    all -inf at positions without a distribution term (`teachers.shared_support`); rows of a teacher of the
    student's tokenizer are finite, so there this is the identity, value for value.

    Returns (the student's logits, -inf off the support; the teacher's, a finite stand-in where there is no term,
    whose loss the caller drops; term_B_N, bool). A divergence of the two is the one between the distributions
    renormalised over the shared support S (softmax over S; -inf entries count 0 log 0 = 0)."""
    support_B_N_V = torch.isfinite(teacher_B_N_V)
    term_B_N = support_B_N_V.any(-1)
    teacher_B_N_V = torch.where(term_B_N[..., None], teacher_B_N_V, 0.0)
    student_B_N_V = torch.where(support_B_N_V | ~term_B_N[..., None], student_B_N_V, -torch.inf)
    return student_B_N_V, teacher_B_N_V, term_B_N


def full_distribution_terms(token_loss: TokenLoss, fused: FusedLoss | None = None):
    """`block_terms` of an objective over the teacher's full distribution: per block, the routed teacher's logits
    of the same positions (`logit_blocks`), the per-token loss (with grad) and the teacher's log pi_T of each
    sampled token (for the diagnostics: no extra teacher pass). With several blocks, `fused` (the loss and the
    teacher's log-sum-exp in one autograd function, `fused_kl`) replaces `token_loss`; one block keeps the
    composed computation, op for op.

    With a teacher of another tokenizer in the panel, the loss is over the shared support at the positions that
    have a term (`restrict_to_shared`), 0 elsewhere; "term", "chunk" and the chunks' teacher logprobs
    (`sampled_logprobs`, which such a teacher answers from the pass that gave its logits: "teacher_lp") go to
    `distribution_step`, which gives the other positions the chunk's sampled-token term, and the masses outside
    the support go to the metrics."""

    def prepare(batch: RolloutBatch, names_B: list[str] | None, K: int, cfg: PolicyConfig) -> BlockTerms:
        d, teachers = cfg.distill, cfg.teachers
        assert d is not None and teachers is not None and names_B is not None
        blocks = teachers.logit_blocks(batch, names_B, K)
        chunks_B_T = chunk_layout(teachers, batch, names_B)  # None: every teacher reads the student's tokens
        chunk_lp_B_T = None if chunks_B_T is None else scored_rows(teachers.sampled_logprobs, batch, names_B)

        def terms(student_B_N_V: torch.Tensor, start: int, stop: int, y_B_N: torch.Tensor,
                  rows: torch.Tensor | None) -> Scores:
            teacher_B_N_V = blocks(start, stop, rows)[:, : student_B_N_V.shape[1]]
            raw_B_N_V = student_B_N_V
            if chunks_B_T is not None:
                student_B_N_V, teacher_B_N_V, term_B_N = restrict_to_shared(student_B_N_V, teacher_B_N_V)
            if fused is not None and (start, stop) != (0, K):
                loss_B_N, lse_B_N = fused(student_B_N_V, teacher_B_N_V)
                picked_B_N = upcast(teacher_B_N_V).gather(-1, y_B_N.unsqueeze(-1)).squeeze(-1)
                out = {"loss": loss_B_N, "teacher_lp": picked_B_N - lse_B_N}
            else:
                out = {"loss": token_loss(student_B_N_V, teacher_B_N_V, d),
                       "teacher_lp": aligned_token_logprobs(teacher_B_N_V, y_B_N)}
            if chunks_B_T is None:
                return out
            assert chunk_lp_B_T is not None
            cols = slice(start, start + student_B_N_V.shape[1])  # of the last W = K - 1 columns
            chunk_lp_B_N, chunk_B_N = (row_slice(x[:, x.shape[1] - (K - 1):], rows, cols)
                                       for x in (chunk_lp_B_T, chunks_B_T))
            return out | shared_support_terms(raw_B_N_V, student_B_N_V, teacher_B_N_V, term_B_N, out["loss"],
                                              y_B_N, chunk_lp_B_N, chunk_B_N)

        return terms

    return prepare


def shared_support_terms(raw_B_N_V: torch.Tensor, student_B_N_V: torch.Tensor, teacher_B_N_V: torch.Tensor,
                         term_B_N: torch.Tensor, loss_B_N: torch.Tensor, y_B_N: torch.Tensor,
                         chunk_lp_B_N: torch.Tensor, chunk_B_N: torch.Tensor) -> Scores:
    """A block's terms of a full-distribution objective with a teacher of another tokenizer: the loss where there
    is a term (0 elsewhere), the chunks and their teacher logprobs (`distribution_step`'s sampled-token term),
    and the masses outside the shared support S at the terms, detached:

        student: 1 - P_S = 1 - exp(lse_S(s) - lse(s));
        teacher: 1 - Q_S, log Q_S = lse_S(t) - t_y + log q(y): the teacher ships its logits on S only, and its
                 logprob of the sampled token y (a single-token chunk's, `sampled_logprobs`) fixes the
                 normaliser over its whole vocabulary."""
    with torch.no_grad():
        log_p_in = torch.logsumexp(upcast(student_B_N_V), -1) - torch.logsumexp(upcast(raw_B_N_V), -1)
        t = upcast(teacher_B_N_V)
        log_q_in = torch.logsumexp(t, -1) - t.gather(-1, y_B_N.unsqueeze(-1)).squeeze(-1) + chunk_lp_B_N
        log_q_in = torch.where(term_B_N & torch.isfinite(log_q_in), log_q_in, 0.0)
    return {"loss": torch.where(term_B_N, loss_B_N, 0.0), "term": term_B_N.to(loss_B_N.dtype),
            "teacher_lp": chunk_lp_B_N, "chunk": chunk_B_N,
            "student_out": torch.where(term_B_N, -torch.expm1(log_p_in), 0.0),
            "teacher_out": -torch.expm1(log_q_in.clamp(max=0.0))}


def topk_terms(batch: RolloutBatch, names_B: list[str] | None, K: int, cfg: PolicyConfig) -> BlockTerms:
    """`block_terms` of the top-k objective: the teacher ships its top-k logprobs and ids once (small, [B, W, k]);
    each block takes the coarse-grained reverse KL of its positions, the student's rest mass and the teacher's
    top-k mass (for the metrics).

    A teacher of another tokenizer ships, at the student's single-token chunks, its top-k tokens that the student
    has (`teachers.shared_support`; -inf entries are no outcome), and -inf rows elsewhere: the positions without
    a term get loss 0 and `distribution_step` gives them the chunk's sampled-token term (the third answer is then
    each chunk's teacher logprob, as `sampled_logprobs`). The rest bin holds everything else, each side's tokens
    the other lacks included: no renormalisation is needed (an HTTP teacher's top-k could not give one)."""
    d, teachers = cfg.distill, cfg.teachers
    assert d is not None and teachers is not None and names_B is not None
    top_lp_B_W_k, top_ids_B_W_k, teacher_lp_B_T = teachers.topk(batch, names_B, d.topk, K - 1)
    teacher_lp_B_W = teacher_lp_B_T[:, teacher_lp_B_T.shape[1] - (K - 1) :]
    chunks_B_T = chunk_layout(teachers, batch, names_B)  # None: every teacher reads the student's tokens

    def terms(student_B_N_V: torch.Tensor, start: int, stop: int, y_B_N: torch.Tensor,
              rows: torch.Tensor | None) -> Scores:
        cols = slice(start, start + student_B_N_V.shape[1])
        top_lp, top_ids, teacher_lp = (row_slice(x, rows, cols) for x in (top_lp_B_W_k, top_ids_B_W_k, teacher_lp_B_W))
        kl_B_N, logp_rest_B_N, logq_in_B_N = topk_reverse_kl_tokens(student_B_N_V, top_lp, top_ids)
        out = {"loss": kl_B_N, "logp_rest": logp_rest_B_N.detach(), "logq_in": logq_in_B_N, "teacher_lp": teacher_lp}
        if chunks_B_T is not None:
            term_B_N = torch.isfinite(top_lp[..., 0])
            out |= {"loss": torch.where(term_B_N, kl_B_N, 0.0), "term": term_B_N.to(kl_B_N.dtype),
                    "chunk": row_slice(chunks_B_T[:, chunks_B_T.shape[1] - (K - 1):], rows, cols)}
        return out

    return terms


def distribution_step(metric: str):
    """An objective whose loss compares the student's and the routed teacher's distributions at every
    completion position (plus alpha * GRPO through the policy-gradient loss): the token mean of its block terms'
    "loss" over the loss mask of the last W tokens (the columns the student's K positions predict).

    With a teacher of another tokenizer (block terms with a "term"), a position has the distribution term only at
    a single-token chunk; every other loss token gets the chunk's sampled-token term instead,
    A_t = sg[log pi_T(c) - log pi_S(c)] (`advantages.chunk_advantages`), through the same policy-gradient loss.
    So each loss token still counts once in the one token mean, as with the student's own tokenizer: a position
    is never dropped from the denominator, and the tokens inside longer chunks (in a character student, most
    digits of a multi-digit teacher token) keep a teacher signal."""

    def step(mb: MicroBatch, cfg: PolicyConfig) -> tuple[torch.Tensor, dict[str, float], Kept]:
        d, batch, terms = cfg.distill, mb.batch, mb.terms_B_W
        assert d is not None
        T, W = batch.input_ids_B_T.shape[1], terms["loss"].shape[1]
        mask_B_W = mb.loss_mask_B_T[:, T - W :]
        loss = masked_mean(terms["loss"], mask_B_W)
        term_mask_B_W = mask_B_W * terms["term"] if "term" in terms else mask_B_W
        if "logq_in" in terms:
            metrics = topk_metrics(masked_mean(terms["loss"], term_mask_B_W), terms["logp_rest"], terms["logq_in"],
                                   term_mask_B_W)
        else:
            metrics = {metric: float(masked_mean(terms["loss"], term_mask_B_W).detach())}
        teacher_lp_B_T = pad_front(terms["teacher_lp"], T) * batch.completion_mask_B_T
        loss = loss * mb.share  # a token mean over this micro-batch -> its share of the whole step's
        kept = {"teacher_lp_B_T": teacher_lp_B_T}
        pg_B_T = None
        if d.alpha > 0:
            assert mb.grpo_B_T is not None
            pg_B_T = d.alpha * mb.grpo_B_T
        if "term" in terms:
            metrics.update(shared_support_metrics(terms, mask_B_W, term_mask_B_W))
            chunks_B_T = pad_front(terms["chunk"], T)
            kept["chunked_B_T"] = (chunks_B_T >= 0).to(teacher_lp_B_T.dtype) * batch.completion_mask_B_T
            off_B_T = pad_front(1.0 - terms["term"], T) * mb.loss_mask_B_T  # loss tokens without a term
            if bool(off_B_T.any()):
                chunk_B_T = chunk_advantages(teacher_lp_B_T, mb.logprobs_B_T.detach(), batch.completion_mask_B_T,
                                             chunks_B_T) * off_B_T
                pg_B_T = chunk_B_T if pg_B_T is None else pg_B_T + chunk_B_T
        if pg_B_T is not None:
            pg, pg_metrics = pg_loss(mb, cfg, pg_B_T)
            loss = loss + pg
            metrics.update(pg_metrics)
        return loss, metrics, kept

    return step


def shared_support_metrics(terms: Scores, mask_B_W: torch.Tensor, term_mask_B_W: torch.Tensor) -> dict[str, float]:
    """With a teacher of another tokenizer: the share of loss tokens with a distribution term (the rest get the
    chunk term), and, at those, the student's and the teacher's mass outside the shared support."""
    out = {"xtok/distribution_token_frac": float(masked_mean(terms["term"], mask_B_W))}
    for side in ("student", "teacher"):
        if f"{side}_out" in terms:
            out[f"xtok/{side}_outside_mass"] = float(masked_mean(terms[f"{side}_out"], term_mask_B_W))
    return out


def sampled_metrics(kept: Kept, mask_B_T: torch.Tensor, names_B: list[str] | None) -> dict[str, float]:
    """Per-teacher reverse KL and routing share (`mopd_metrics`), teacher NLL, and the mean surprise weight, over
    the rows with a teacher (and the share of reward-only rows, when there are any)."""
    assert names_B is not None
    rows = teacher_rows(names_B)
    if not rows:
        return {"reward_only/share": 1.0}
    if len(rows) < len(names_B):
        idx = torch.tensor(rows, dtype=torch.long, device=mask_B_T.device)
        sub = sampled_metrics({k: v[idx] for k, v in kept.items()}, mask_B_T[idx], [names_B[i] for i in rows])
        return {**sub, "reward_only/share": 1 - len(rows) / len(names_B)}
    if "chunked_B_T" in kept:  # a chunk's advantage sits on each of its tokens: the per-token estimate is the
        # log-ratio of every chunk once (its teacher logprob is on one token) over the tokens in chunks
        in_chunks = mask_B_T * kept["chunked_B_T"]
        per_token = -(kept["logprobs_B_T"].float() - kept["teacher_lp_B_T"].float()) * in_chunks
        metrics = mopd_metrics(per_token, in_chunks, names_B)
    else:
        metrics = mopd_metrics(kept["opd_B_T"], mask_B_T, names_B)
    metrics.update(teacher_diagnostics(kept["teacher_lp_B_T"], mask_B_T, names_B))
    if "surprise_B_T" in kept:
        metrics["surprise/weight_mean"] = float(masked_mean(kept["surprise_B_T"], mask_B_T))
    if "chunked_B_T" in kept:  # a teacher of another tokenizer: the share of tokens in aligned chunks
        metrics["xtok/aligned_token_frac"] = float(masked_mean(kept["chunked_B_T"], mask_B_T))
    return metrics


def distribution_metrics(kept: Kept, mask_B_T: torch.Tensor, names_B: list[str] | None) -> dict[str, float]:
    """Per-teacher routing share, teacher NLL and the sampled-token reverse-KL estimate; with a teacher of another
    tokenizer (a chunk's teacher logprob on one of its tokens) over the tokens in chunks, each chunk once, as
    `sampled_metrics`, and the share of tokens in chunks."""
    assert names_B is not None
    if "chunked_B_T" not in kept:
        return teacher_diagnostics(kept["teacher_lp_B_T"], mask_B_T, names_B, kept["logprobs_B_T"])
    in_chunks_B_T = mask_B_T * kept["chunked_B_T"]
    return {**teacher_diagnostics(kept["teacher_lp_B_T"], in_chunks_B_T, names_B, kept["logprobs_B_T"]),
            "xtok/aligned_token_frac": float(masked_mean(kept["chunked_B_T"], mask_B_T))}


@dataclass(frozen=True)
class Objective:
    step: Callable[[MicroBatch, PolicyConfig], tuple[torch.Tensor, dict[str, float], Kept]]
    batch_metrics: Callable[[Kept, torch.Tensor, list[str] | None], dict[str, float]] | None = None
    uses_grpo: bool = False  # needs GRPO advantages even without `alpha` (pure GRPO)
    # per-token terms computed from each block of the student's logits (distribution objectives); called with
    # (micro-batch rows, their teachers, K, config) before the student's forward
    block_terms: Callable[[RolloutBatch, list[str] | None, int, PolicyConfig], BlockTerms] | None = None
    # "reverse" / "forward": a KL `fused_head` computes with its gradient in the forward when it is the whole loss
    fused_head: str | None = None


OBJECTIVES: dict[str, Objective] = {
    "grpo": Objective(grpo_step, uses_grpo=True),
    "sampled": Objective(sampled_step, sampled_metrics),
    "topk": Objective(distribution_step("distill/topk_reverse_kl"), distribution_metrics, block_terms=topk_terms),
    "full_reverse_kl": Objective(
        distribution_step("distill/reverse_kl"), distribution_metrics,
        block_terms=full_distribution_terms(lambda s, t, d: reverse_kl_tokens(s, t), reverse_kl_and_teacher_lse),
        fused_head="reverse",
    ),
    "forward_kl": Objective(
        distribution_step("distill/forward_kl"), distribution_metrics,
        block_terms=full_distribution_terms(lambda s, t, d: forward_kl_tokens(s, t), forward_kl_and_teacher_lse),
        fused_head="forward",
    ),
    "jsd": Objective(
        distribution_step("distill/jsd"), distribution_metrics,
        block_terms=full_distribution_terms(lambda s, t, d: jsd_tokens(s, t, d.jsd_beta)),
    ),
}
