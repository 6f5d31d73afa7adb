"""Pure scoring functions for the MOPD report.

recovery = (student - start) / (teacher - start): the fraction of a teacher's gain over the start
checkpoint that the distilled student recovers on that teacher's domain. 1.0 means the student matched
the teacher, 0.0 means no gain over start, negative means it got worse, above 1.0 means it beat the teacher.
The normalized score is the mean recovery over the domains where recovery is defined.

Why a minimum gain (`report.min_teacher_gain`, default MIN_TEACHER_GAIN): recovery divides by the teacher's
gain, so a teacher that gained almost nothing turns noise into an absurd ratio (a teacher that gained +0.004 on
a 64-prompt held-out set made a normalized score of 9.13, issue 38). A domain whose teacher gained less than the
minimum is "teacher gain too small": its recovery is undefined and it is left out of the normalized score, with a
warning (`gain_warning`) in the report, in `mopd compare` and in summary.json.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..core.schema.defaults import MIN_TEACHER_GAIN

__all__ = ["MIN_TEACHER_GAIN", "TOO_SMALL", "gain_too_small", "gain_warning", "gain_warnings", "normalized_score",
           "recovery"]

TOO_SMALL = "teacher gain too small"
# A gain at the minimum counts: 0.5 - 0.4 is 0.09999999999999998 in float64. Scores are means of rewards in [0, 1]
# whose float64 roundoff is ~1e-16 a term, so this absorbs the rounding and nothing a held-out set can measure.
ROUNDOFF = 1e-9


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def gain_too_small(start: float | None, teacher: float | None, min_gain: float = MIN_TEACHER_GAIN) -> bool:
    """True when both scores exist and the teacher's gain over start is below `min_gain` (or not positive: a
    minimum of 0 still needs a gain to divide by)."""
    if not (_finite(start) and _finite(teacher)):
        return False
    gain = float(teacher) - float(start)  # type: ignore[arg-type]
    return gain <= 0 or gain < min_gain - ROUNDOFF


def recovery(start: float | None, teacher: float | None, student: float | None,
             min_gain: float = MIN_TEACHER_GAIN) -> float | None:
    """(student - start) / (teacher - start), or None when undefined.

    Undefined when any score is missing or non-finite, or when the teacher's gain is too small
    (`gain_too_small`): there is no gain worth recovering.
    """
    if not (_finite(start) and _finite(teacher) and _finite(student)) or gain_too_small(start, teacher, min_gain):
        return None
    return (float(student) - float(start)) / (float(teacher) - float(start))  # type: ignore[arg-type]


def gain_warning(domain: str, teacher: str, start: float, score: float, min_gain: float) -> str:
    """The one line every place that leaves a domain out for its teacher's gain prints."""
    return (f"{domain}: {TOO_SMALL}: teacher {teacher!r} gained {score - start:+.3f} over the start "
            f"({start:.3f} -> {score:.3f}), under the minimum {min_gain:g} (`report.min_teacher_gain`); "
            "left out of the normalized score")


def gain_warnings(start: dict[str, float | None], teacher: dict[str, float | None], teacher_stage: dict[str, str],
                  min_gain: float) -> list[str]:
    """`gain_warning` for every domain whose teacher gained too little, in the order of `teacher_stage`."""
    return [gain_warning(d, t, start[d], teacher[d], min_gain)  # type: ignore[arg-type]
            for d, t in teacher_stage.items() if gain_too_small(start.get(d), teacher.get(d), min_gain)]


def normalized_score(recoveries: Iterable[float | None]) -> float | None:
    """Mean of the defined (non-None, finite) recoveries; None when none is defined."""
    kept = [float(r) for r in recoveries if _finite(r)]
    if not kept:
        return None
    return sum(kept) / len(kept)
