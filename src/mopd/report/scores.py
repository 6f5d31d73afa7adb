"""Pure scoring functions for the MOPD report.

recovery = (student - start) / (teacher - start): the fraction of a teacher's gain over the start
checkpoint that the distilled student recovers on that teacher's domain. 1.0 means the student matched
the teacher, 0.0 means no gain over start, negative means it got worse, above 1.0 means it beat the teacher.
The normalized score is the mean recovery over the domains where recovery is defined.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# A teacher must beat start by more than this for recovery to be defined.
MIN_TEACHER_GAIN = 1e-9


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def recovery(start: float | None, teacher: float | None, student: float | None) -> float | None:
    """(student - start) / (teacher - start), or None when undefined.

    Undefined when any score is missing or non-finite, or when the teacher did not improve on start
    (teacher - start <= MIN_TEACHER_GAIN): there is no gain to recover.
    """
    if not (_finite(start) and _finite(teacher) and _finite(student)):
        return None
    gain = float(teacher) - float(start)
    if gain <= MIN_TEACHER_GAIN:
        return None
    return (float(student) - float(start)) / gain


def normalized_score(recoveries: Iterable[float | None]) -> float | None:
    """Mean of the defined (non-None, finite) recoveries; None when none is defined."""
    kept = [float(r) for r in recoveries if _finite(r)]
    if not kept:
        return None
    return sum(kept) / len(kept)
