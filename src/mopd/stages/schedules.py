"""Per-step schedules of the sampling stages (rlvr, mopd): sampling temperature and difficulty curriculum.

Both are pure functions of (step, total steps), so a stage resumed at step k samples exactly as an
uninterrupted one would (the problems and tokens of a step are already derived from (seed, step)).
"""

from __future__ import annotations

from collections.abc import Sequence


def temperature_at(step: int, total: int, start: float, end: float | None, schedule: str) -> float:
    """Sampling temperature of step `step` (0-based) of `total`.

    constant: `start`.  linear: start + (end - start) * step / (total - 1), so the first step samples at
    `start` and the last at `end` (start > end anneals from exploratory to sharp, start < end the reverse).
    """
    if schedule == "constant":
        return start
    if schedule != "linear":
        raise ValueError(f"unknown temperature schedule {schedule!r}; expected 'constant' or 'linear'")
    if end is None:
        raise ValueError("a linear temperature schedule needs an end temperature")
    frac = min(max(step, 0), total - 1) / max(1, total - 1)
    return start + (end - start) * frac


def curriculum_levels(levels: Sequence[int], step: int, total: int) -> list[int]:
    """The difficulty levels a curriculum allows at `step` of `total`: the easiest first, the rest unlocked
    one by one at equal intervals.

        allowed = the n easiest of the K levels,  n = min(K, 1 + floor(K * step / total))

    so the first 1/K of the steps draw only the easiest level and the last 1/K draw from all of them.
    """
    ordered = sorted(levels)
    k = len(ordered)
    n = min(k, 1 + (k * max(step, 0)) // max(1, total))
    return ordered[:n]
