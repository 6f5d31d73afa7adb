"""Which teacher scores each row: multi-teacher distillation is routing, not a new algorithm.

It lives in the bottom layer because both sides of the scoring protocol (`core.scoring.TeacherScorer.route`)
need the same answer: every teacher backend routes a batch with it, and the learner's per-teacher metrics are
keyed by the names it returns.
"""

from __future__ import annotations

from collections.abc import Mapping


def route_teachers(domains: list[str], teacher_of_domain: Mapping[str, str]) -> list[str]:
    """Per-row teacher name: the teacher that row's domain routes to (multi-teacher = one lookup).

    Args:
        domains: domain name per row (`RolloutBatch.domains`).
        teacher_of_domain: domain -> teacher name.

    Returns:
        teacher_names_B: list of teacher names, one per row.

    Raises:
        ValueError: naming the first domain that has no teacher.
    """
    missing = sorted({d for d in domains if d not in teacher_of_domain})
    if missing:
        raise ValueError(
            f"no teacher routed for domain(s) {missing}; routed domains: {sorted(teacher_of_domain)}"
        )
    return [teacher_of_domain[d] for d in domains]
