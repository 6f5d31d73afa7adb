"""PPO with a value model (the `ppo` stage; Schulman et al. 2017, InstructGPT's RLHF step): per-token rewards with
a KL penalty, GAE, the clipped policy objective and the clipped value loss.

All tensors are aligned to the rollout batch's input_ids (`core/batch.py`): column t concerns the token at t, and
the value V_t is the critic's estimate of the state *before* that token (its output at position t - 1), so on a
row's completion tokens 1..n (mask 1, contiguous):

    r_t      = -kl_coef * (log pi_old(y_t) - log ref(y_t))  +  [t = n] * R          (R: the sequence's reward)
    delta_t  = r_t + gamma * V_{t+1} - V_t                                           (V_{n+1} = 0: terminal)
    A_t      = delta_t + gamma * lam * A_{t+1}                                       (A_{n+1} = 0)
    returns  = A_t + V_t
    policy   = mean_t -min(rho_t A_t, clip(rho_t, 1 - clip, 1 + clip) A_t),   rho_t = pi(y_t) / pi_old(y_t)
    value    = mean_t 0.5 * max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -vc, vc) - R_t)^2)

(means over the step's completion tokens). Advantages are whitened over the batch's completion tokens before the
policy loss (zero mean, unit variance; the usual PPO practice), and are constants like every advantage here.
"""

from __future__ import annotations

import torch

from ..core.batch import RolloutBatch
from ..core.logprobs import masked_mean
from ..models.forward import final_hidden
from .chunked import pad_front, token_scores


def token_rewards(
    reward_B: torch.Tensor, logprobs_old_B_T: torch.Tensor, ref_logprobs_B_T: torch.Tensor,
    mask_B_T: torch.Tensor, kl_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """r_t of the module docstring: the KL penalty on every completion token, the reward on the last one."""
    mask = mask_B_T.float()
    kl_B_T = (logprobs_old_B_T - ref_logprobs_B_T) * mask
    rewards_B_T = -kl_coef * kl_B_T
    last_B = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)  # each row's last completion token
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards_B_T[rows, last_B] += reward_B.to(rewards_B_T.dtype) * (mask.sum(-1) > 0)
    return rewards_B_T, {"ppo/kl": float(masked_mean(kl_B_T, mask)), "ppo/reward": float(reward_B.float().mean())}


def gae(
    rewards_B_T: torch.Tensor, values_B_T: torch.Tensor, mask_B_T: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over each row's completion tokens: (advantages,
    returns), both 0 off the mask."""
    mask = mask_B_T.float()
    T = mask.shape[1]
    advantages = torch.zeros_like(rewards_B_T)
    next_value = torch.zeros_like(rewards_B_T[:, 0])
    next_advantage = torch.zeros_like(rewards_B_T[:, 0])
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards_B_T[:, t] + gamma * next_value - values_B_T[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # a token off the mask (padding after the completion, or the prompt) passes nothing back
        next_value = values_B_T[:, t] * m
        next_advantage = advantage * m
    return advantages, (advantages + values_B_T) * mask


def whiten(advantages_B_T: torch.Tensor, mask_B_T: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean and unit (population) variance over the masked tokens; 0 off the mask."""
    mask = mask_B_T.float()
    mean = masked_mean(advantages_B_T, mask)
    var = masked_mean((advantages_B_T - mean) ** 2, mask)
    return (advantages_B_T - mean) / (var.sqrt() + eps) * mask


def clipped_policy_loss(
    logprobs_B_T: torch.Tensor, old_logprobs_B_T: torch.Tensor, advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor, clip: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (module docstring), a token mean; metrics: clip fraction and approximate KL."""
    mask = mask_B_T.float()
    ratio = torch.exp(logprobs_B_T - old_logprobs_B_T.detach())
    unclipped = ratio * advantages_B_T
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages_B_T
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    r = ratio.detach()
    return loss, {
        "ppo/policy_loss": float(loss.detach()),
        "ppo/clip_frac": float(masked_mean(((r - 1).abs() > clip).float(), mask)),
        "ppo/approx_kl": float(masked_mean((r - 1) - r.log(), mask)),
    }


def clipped_value_loss(
    values_B_T: torch.Tensor, old_values_B_T: torch.Tensor, returns_B_T: torch.Tensor, mask_B_T: torch.Tensor,
    value_clip: float | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The value loss of the module docstring (without clipping when `value_clip` is None), a token mean."""
    mask = mask_B_T.float()
    err = (values_B_T - returns_B_T) ** 2
    if value_clip is not None:
        clipped = old_values_B_T + (values_B_T - old_values_B_T).clamp(-value_clip, value_clip)
        err = torch.maximum(err, (clipped - returns_B_T) ** 2)
    loss = 0.5 * masked_mean(err, mask)
    return loss, {"ppo/value_loss": float(loss.detach()),
                  "ppo/value_mean": float(masked_mean(values_B_T.detach(), mask))}


def completion_window(batch: RolloutBatch) -> int:
    """K: the positions from the column before the first completion token to the end (the logits that matter)."""
    T = batch.input_ids_B_T.shape[1]
    return T - batch.first_completion_column + 1


def token_logprobs(model, batch: RolloutBatch, logit_chunk: int | None = None) -> torch.Tensor:
    """log pi(y_t) of each token of the batch under `model` (temperature 1), aligned to input_ids, 0 before the
    completion window: with grad when the model has one."""
    T, K = batch.input_ids_B_T.shape[1], completion_window(batch)
    hidden, head = final_hidden(model, batch.input_ids_B_T, batch.attention_mask_B_T, keep=K)
    scores = token_scores(hidden, head, batch.input_ids_B_T[:, T - K + 1 :], logit_chunk,
                          live_B_W=batch.completion_mask_B_T[:, T - K + 1 :] > 0)
    return pad_front(scores["logprobs"], T) * batch.completion_mask_B_T


def token_values(critic, batch: RolloutBatch) -> torch.Tensor:
    """V_t of each completion token: the critic's (a one-label token classifier) output at position t - 1."""
    out_B_T = critic(input_ids=batch.input_ids_B_T, attention_mask=batch.attention_mask_B_T).logits[..., 0].float()
    return torch.cat([out_B_T.new_zeros(out_B_T.shape[0], 1), out_B_T[:, :-1]], dim=1) * batch.completion_mask_B_T
