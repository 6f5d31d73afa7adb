"""Difficulty filtering of sampled groups: keep only prompts the policy sometimes, but not always, solves.

A prompt whose G rollouts all pass (pass rate 1) is already learned, one whose rollouts all fail (pass rate 0)
is out of reach; both give GRPO a zero advantage and, for distillation, spend the batch on prompts that teach
least. DAPO's dynamic sampling (arXiv:2503.14476, Sec. 3.2) drops such groups; here they are dropped from the
loss (masked), not resampled, so a step's compute stays fixed and resume stays exact.
"""

from __future__ import annotations

import torch


def solved_group_filter(
    rewards_B: torch.Tensor, group_ids_B: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """keep_B = False for rows of groups whose pass rate (fraction of rows with reward == 1) is 0 or 1.

    A row passes when its reward is exactly 1 (an exact match; partial credit < 1 does not pass).

    Args:
        rewards_B: float reward per row.
        group_ids_B: long group id per row (rows from the same prompt share it).

    Returns:
        keep_B: bool per row.
        metrics: "filter/kept_frac", "filter/all_solved_frac", "filter/none_solved_frac" (fractions of rows).
    """
    if rewards_B.dim() != 1 or group_ids_B.shape != rewards_B.shape:
        raise ValueError(f"rewards {tuple(rewards_B.shape)} and group_ids {tuple(group_ids_B.shape)} must be [B]")
    passed_B = (rewards_B == 1).double()
    _, group_B = torch.unique(group_ids_B, return_inverse=True)  # dense ids 0..G-1
    num_groups = int(group_B.max()) + 1 if len(group_B) else 0
    rate_G = passed_B.new_zeros(num_groups).scatter_reduce(0, group_B, passed_B, "mean", include_self=False)
    rate_B = rate_G[group_B]
    all_B, none_B = rate_B == 1, rate_B == 0
    keep_B = ~(all_B | none_B)
    n = max(len(rewards_B), 1)
    metrics = {
        "filter/kept_frac": float(keep_B.sum()) / n,
        "filter/all_solved_frac": float(all_B.sum()) / n,
        "filter/none_solved_frac": float(none_B.sum()) / n,
    }
    return keep_B, metrics
