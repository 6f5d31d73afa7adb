"""Preference optimisation against a frozen reference (the `dpo` stage): the losses, and the step over pairs.

Why a module of its own: a pair couples two rows (chosen, rejected), so its loss is not a token mean like the
policy and supervised steps; only the sequence log-probabilities and the pair's margin enter it. With s(y) the
sum over the completion tokens of log pi(y_t | x, y_<t) (its mean with `length_normalized`), and the same under
the reference, the log-ratio margin of a pair is

    m = (s_pi(chosen) - s_ref(chosen)) - (s_pi(rejected) - s_ref(rejected))

    sigmoid (DPO, Rafailov et al. 2023):  loss = -log sigmoid(beta * m)
    ipo     (Azar et al. 2023):           loss = (m - 1 / (2 beta))^2

averaged over the step's pairs. Metrics: the implicit reward margin beta * m (the implicit reward of an answer is
beta * (s_pi - s_ref)) and the accuracy, the fraction of pairs with m > 0.

The pairs' rows are built like SFT rows (`supervised.supervised_batch`: `prompt answer [EOS]`, targets the answer
and EOS), so a pair from any source (the policy's samples, another model's text) is scored the same way.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..envs import Problem
from ..models.forward import final_hidden
from ..models.prompting import RAW, PromptFormat
from .chunked import pad_front, token_scores
from .micro_batches import accumulate_micro_batches
from .supervised import supervised_batch

PreferenceLoss = Literal["sigmoid", "ipo"]


def sequence_logprobs(logprobs_B_T: torch.Tensor, mask_B_T: torch.Tensor, length_normalized: bool) -> torch.Tensor:
    """Per-row sum (or, `length_normalized`, mean) of the token logprobs under `mask_B_T` -> [B]."""
    total_B = (logprobs_B_T * mask_B_T).sum(-1)
    return total_B / mask_B_T.sum(-1).clamp(min=1) if length_normalized else total_B


def preference_loss(
    policy_chosen_P: torch.Tensor,
    policy_rejected_P: torch.Tensor,
    ref_chosen_P: torch.Tensor,
    ref_rejected_P: torch.Tensor,
    *,
    beta: float,
    loss: PreferenceLoss,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean pair loss of the module docstring over P pairs, and its metrics (margin, accuracy)."""
    margin_P = (policy_chosen_P - ref_chosen_P) - (policy_rejected_P - ref_rejected_P)
    if loss == "sigmoid":
        per_pair_P = -F.logsigmoid(beta * margin_P)
    elif loss == "ipo":
        per_pair_P = (margin_P - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r}")
    value = per_pair_P.mean()
    m = margin_P.detach()
    return value, {
        "loss": float(value.detach()),
        "dpo/reward_margin": float(beta * m.mean()),
        "dpo/accuracy": float((m > 0).float().mean()),
        "dpo/chosen_reward": float(beta * (policy_chosen_P - ref_chosen_P).detach().mean()),
        "dpo/rejected_reward": float(beta * (policy_rejected_P - ref_rejected_P).detach().mean()),
    }


def pair_logprobs(
    model, ids_B_T: torch.Tensor, attn_B_T: torch.Tensor, target_B_T: torch.Tensor, *, length_normalized: bool,
    logit_chunk: int | None,
) -> torch.Tensor:
    """Sequence logprobs [B] of `model` over the target tokens of rows built by `supervised_batch`."""
    hidden_B_T_H, head = final_hidden(model, ids_B_T, attn_B_T)
    scores = token_scores(hidden_B_T_H, head, ids_B_T[:, 1:], logit_chunk, live_B_W=target_B_T[:, 1:] > 0)
    return sequence_logprobs(pad_front(scores["logprobs"], ids_B_T.shape[1]), target_B_T, length_normalized)


def dpo_loss(
    model, reference, tokenizer, chosen: list[Problem], rejected: list[Problem], *, beta: float,
    loss: PreferenceLoss, length_normalized: bool, micro_batch_size: int | None = None,
    prompt_format: PromptFormat = RAW, logit_chunk: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The preference step over pairs (chosen[i], rejected[i]), each a Problem whose `answer` is the answer text.

    The reference scores every row once without a graph; the policy's forward and backward run a micro-batch of
    pairs at a time (`micro_batch_size` rows, so half as many pairs; the chosen and rejected rows of a pair are
    always in the same micro-batch), each part's mean scaled by its share of the pairs, so the accumulated
    gradient is the whole step's. Returns (loss, metrics).
    """
    P = len(chosen)
    dev = next(model.parameters()).device
    ids, attn, target = (
        x.to(dev) for x in supervised_batch(tokenizer, [*chosen, *rejected], loss_on_prompt=False,
                                            prompt_format=prompt_format)
    )
    with torch.no_grad():
        ref_B = pair_logprobs(reference, ids, attn, target, length_normalized=length_normalized,
                              logit_chunk=logit_chunk)
    pairs_per_part = None if micro_batch_size is None else max(1, micro_batch_size // 2)

    def part(pairs: slice, share: float):
        rows = torch.cat([torch.arange(pairs.start, pairs.stop), torch.arange(P + pairs.start, P + pairs.stop)])
        rows = rows.to(dev)
        policy_b = pair_logprobs(model, ids[rows], attn[rows], target[rows], length_normalized=length_normalized,
                                 logit_chunk=logit_chunk)
        n = pairs.stop - pairs.start
        value, metrics = preference_loss(policy_b[:n], policy_b[n:], ref_B[rows][:n], ref_B[rows][n:], beta=beta,
                                         loss=loss)
        return value * share, metrics, {}

    value, metrics, _ = accumulate_micro_batches(part, torch.ones(P, 1, device=dev), pairs_per_part)
    metrics["loss"] = float(value.detach())
    return value, metrics
