"""Per-teacher diagnostics of a MOPD step: the signals that catch a bad teacher early.

- routing share: the fraction of rows each teacher scored (a teacher that receives no rows teaches nothing);
- teacher NLL: mean -log pi_T(y_t) over the completion tokens of the rows routed to teacher T. The student
  samples y; a teacher that finds the student's own rollouts very unlikely (high or rising NLL) is a poor
  guide for them: a foreign-lineage teacher, or one the student has drifted away from;
- reverse KL (optional): the sampled-token estimate mean (log pi_S(y_t) - log pi_T(y_t)) per teacher, for the
  objectives whose loss does not already log it.
Nothing here carries gradient; every value is a python float under a namespaced key.
"""

from __future__ import annotations

import torch

from ..core.logprobs import masked_mean


def teacher_diagnostics(
    teacher_logprobs_B_T: torch.Tensor,
    completion_mask_B_T: torch.Tensor,
    teacher_names_B: list[str],
    student_logprobs_B_T: torch.Tensor | None = None,
) -> dict[str, float]:
    """Routing share, teacher NLL and (with `student_logprobs_B_T`) reverse KL, per teacher and overall.

        teacher_nll(T) = sum_{b routed to T, t} m_bt * -log pi_T(y_bt) / sum_{b routed to T, t} m_bt

    Args:
        teacher_logprobs_B_T: log pi_T(y_t) of each sampled token under the row's routed teacher.
        completion_mask_B_T: 1 on completion tokens.
        teacher_names_B: routed teacher per row.
        student_logprobs_B_T: log pi_S(y_t); when given, "mopd/reverse_kl[/<t>]" are logged too.

    Returns:
        metrics: "mopd/teacher_nll", and per teacher t "mopd/teacher_nll/<t>", "mopd/routing_share/<t>"
            (and "mopd/reverse_kl", "mopd/reverse_kl/<t>" when student logprobs are given).
    """
    batch = completion_mask_B_T.shape[0]
    if len(teacher_names_B) != batch:
        raise ValueError(f"teacher_names_B has {len(teacher_names_B)} names for {batch} rows")
    mask_B_T = completion_mask_B_T.float()
    nll_B_T = -teacher_logprobs_B_T.detach().float()
    metrics = {"mopd/teacher_nll": float(masked_mean(nll_B_T, mask_B_T))}
    log_ratio_B_T = None
    if student_logprobs_B_T is not None:
        log_ratio_B_T = student_logprobs_B_T.detach().float() - teacher_logprobs_B_T.detach().float()
        metrics["mopd/reverse_kl"] = float(masked_mean(log_ratio_B_T, mask_B_T))
    for teacher in sorted(set(teacher_names_B)):
        rows_B = torch.tensor([name == teacher for name in teacher_names_B], device=mask_B_T.device)
        rows_mask_B_T = mask_B_T * rows_B[:, None]
        metrics[f"mopd/teacher_nll/{teacher}"] = float(masked_mean(nll_B_T, rows_mask_B_T))
        metrics[f"mopd/routing_share/{teacher}"] = float(rows_B.sum()) / batch
        if log_ratio_B_T is not None:
            metrics[f"mopd/reverse_kl/{teacher}"] = float(masked_mean(log_ratio_B_T, rows_mask_B_T))
    return metrics
