"""The one policy-gradient loss every advantage estimator feeds, plus SFT NLL and surprise reweighting.

Inputs are per-token and aligned to `input_ids_B_T` (see `core/batch.py`): current-policy logprobs (with grad),
the sampler's logprobs (the policy that generated the tokens, e.g. vLLM), advantages (constants) and a mask.

Departures from textbook PPO:
- default importance correction is *truncation* (tokens whose sampler/learner ratio leaves
  [eps_low, eps_high] get weight 0) rather than PPO clipping — the sampler/learner mismatch correction
  reported by MiMo-V2-Flash and Nemotron; PPO clipping and plain REINFORCE stay available;
- advantages are clipped to [-adv_clip, adv_clip] (OPD log-ratios are unbounded where the teacher assigns a
  sampled token ~0 probability);
- normalisation is a token mean over the whole batch (DAPO, arXiv:2503.14476), with dropped tokens kept in
  the denominator.
"""

from __future__ import annotations

import torch

from ..core.logprobs import masked_mean
from ..core.schema.defaults import ADV_CLIP, EPS_HIGH, EPS_LOW, IS_MODE, ISMode

# exp() of a log-ratio beyond this is inf in float32 territory; such tokens are dropped/clipped anyway.
_MAX_LOG_RATIO = 20.0


def policy_gradient_loss(
    logprobs_B_T: torch.Tensor,
    sampler_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    is_mode: ISMode = IS_MODE,
    eps_low: float = EPS_LOW,
    eps_high: float = EPS_HIGH,
    adv_clip: float | None = ADV_CLIP,
    loss_normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level policy-gradient loss with an importance correction for sampler/learner mismatch.

    With rho_t = exp(log pi_theta(y_t) - log pi_sampler(y_t)) and A_t = clip(A_t, -adv_clip, adv_clip):
        "truncate": l_t = -rho_t * A_t  if eps_low <= sg[rho_t] <= eps_high  else 0   (token dropped)
                    grad l_t = -rho_t A_t grad log pi_theta(y_t): truncated importance sampling (MiMo-V2-Flash,
                    Nemotron reports); with rho = 1 this is exactly REINFORCE.
        "clip":     l_t = -min(rho_t A_t, clip(rho_t, eps_low, eps_high) A_t)   (PPO, Schulman et al. 2017,
                    eq. 7; here eps_low/eps_high are the ratio bounds themselves, i.e. 1-eps and 1+eps).
        "none":     l_t = -A_t * log pi_theta(y_t)   (plain REINFORCE; sampler logprobs ignored).
    loss = sum_t w_t l_t / N, where N = number of mask tokens in the batch (or `loss_normalizer`), w_t = mask_t
    (times the keep indicator for "truncate"). Dividing by all mask tokens, not only the kept ones, means
    dropping a token does not inflate the weight of the others (the estimate is the untruncated one with
    outlier terms set to 0), and long sequences weigh per token, not per sequence (DAPO token-mean).

    Args:
        logprobs_B_T: log pi_theta(y_t) of the current policy, with grad.
        sampler_logprobs_B_T: log pi_sampler(y_t) recorded at sampling time.
        advantages_B_T: per-token advantages (detached here).
        mask_B_T: 1 on tokens that enter the loss (completion mask, optionally times GRPO's keep_B[:, None]).
        is_mode: "truncate" | "clip" | "none".
        eps_low, eps_high: ratio bounds, 0 < eps_low <= 1 <= eps_high.
        adv_clip: clip advantages to [-adv_clip, adv_clip]; None disables.
        loss_normalizer: denominator override, e.g. the mask-token count of the whole optimizer step when
            accumulating gradients over micro-batches. None = this batch's mask-token count.

    Returns:
        loss: 0-dim tensor.
        metrics: "is/dropped_frac" (fraction of mask tokens dropped ("truncate") or whose clipped branch is
            active, i.e. zero gradient ("clip"); 0 for "none"), "is/ratio_mean" (mean sg[rho] over mask
            tokens), "adv/clipped_frac" (fraction of mask tokens with |A| > adv_clip), "adv/mean" (mean of the
            clipped advantage over mask tokens).
    """
    if not 0 < eps_low <= 1 <= eps_high:
        raise ValueError(f"need 0 < eps_low <= 1 <= eps_high, got eps_low={eps_low}, eps_high={eps_high}")
    if not logprobs_B_T.shape == sampler_logprobs_B_T.shape == advantages_B_T.shape == mask_B_T.shape:
        raise ValueError(
            "shape mismatch: logprobs, sampler_logprobs, advantages, mask = "
            f"{[tuple(x.shape) for x in (logprobs_B_T, sampler_logprobs_B_T, advantages_B_T, mask_B_T)]}"
        )
    mask_B_T = mask_B_T.float()
    on_B_T = mask_B_T > 0
    logprobs_B_T = logprobs_B_T.float()

    adv_B_T = advantages_B_T.detach().float()
    if adv_clip is not None:
        clipped_B_T = on_B_T & (adv_B_T.abs() > adv_clip)
        adv_B_T = adv_B_T.clamp(-adv_clip, adv_clip)
    else:
        clipped_B_T = torch.zeros_like(on_B_T)

    # Off-mask positions get log-ratio 0 so padding/prompt values cannot produce inf/nan.
    log_ratio_B_T = torch.where(on_B_T, logprobs_B_T - sampler_logprobs_B_T.detach().float(), 0.0)
    ratio_B_T = log_ratio_B_T.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    ratio_sg_B_T = ratio_B_T.detach()

    if is_mode == "truncate":
        weight_on_B_T = on_B_T & (ratio_sg_B_T >= eps_low) & (ratio_sg_B_T <= eps_high)
        per_token_B_T = -ratio_B_T * adv_B_T
        dropped_B_T = on_B_T & ~weight_on_B_T
    elif is_mode == "clip":
        weight_on_B_T = on_B_T
        per_token_B_T = -torch.minimum(ratio_B_T * adv_B_T, ratio_B_T.clamp(eps_low, eps_high) * adv_B_T)
        # the clipped (constant) branch is the min exactly in these cases -> zero gradient
        dropped_B_T = on_B_T & (
            ((adv_B_T > 0) & (ratio_sg_B_T > eps_high)) | ((adv_B_T < 0) & (ratio_sg_B_T < eps_low))
        )
    elif is_mode == "none":
        weight_on_B_T = on_B_T
        per_token_B_T = -adv_B_T * logprobs_B_T
        dropped_B_T = torch.zeros_like(on_B_T)
    else:
        raise ValueError(f"unknown is_mode {is_mode!r}; expected 'truncate', 'clip' or 'none'")

    num_tokens = mask_B_T.sum()
    denom = (
        num_tokens
        if loss_normalizer is None
        else torch.tensor(float(loss_normalizer), device=mask_B_T.device)
    )
    # where (not multiply) so that an inf/nan on a dropped or off-mask token cannot leak into the sum
    total = torch.where(weight_on_B_T, per_token_B_T * mask_B_T, 0.0).sum()
    loss = total / denom.clamp(min=1e-8)

    n = max(float(num_tokens), 1e-8)
    metrics = {
        "is/dropped_frac": float(dropped_B_T.sum()) / n if float(num_tokens) > 0 else 0.0,
        "is/ratio_mean": float(masked_mean(ratio_sg_B_T, mask_B_T)),
        "adv/clipped_frac": float(clipped_B_T.sum()) / n if float(num_tokens) > 0 else 0.0,
        "adv/mean": float(masked_mean(adv_B_T, mask_B_T)),
    }
    return loss, metrics


def sft_nll_loss(logprobs_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean negative log-likelihood: -sum_t mask_t log pi_theta(y_t) / sum_t mask_t.

    Args:
        logprobs_B_T: log pi_theta(y_t), with grad, aligned to input_ids.
        mask_B_T: 1 on target tokens.

    Returns:
        loss: 0-dim tensor (0 when the mask is empty).
        metrics: "sft/nll" (the loss value), "sft/num_tokens".
    """
    loss = masked_mean(-logprobs_B_T.float(), mask_B_T)
    return loss, {"sft/nll": float(loss.detach()), "sft/num_tokens": float(mask_B_T.float().sum())}


def surprise_weights(student_logprobs_B_T: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-token weights that up-weight tokens the student found surprising, to multiply advantages with.

        w_t = 1 + alpha * (1 - sg[pi_S(y_t)]),   pi_S(y_t) = exp(student_logprobs_t)

    (token reweighting by student surprise, arXiv:2608.25643). w is in [1, 1 + alpha]; alpha = 0 gives 1.

    Args:
        student_logprobs_B_T: log pi_S of sampled tokens (detached here).
        alpha: strength, >= 0.

    Returns:
        weights_B_T: float32, no grad. Use as `advantages_B_T * weights_B_T`.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return 1.0 + alpha * (1.0 - student_logprobs_B_T.detach().float().exp())
