"""The teacher-gain gate of a MOPD stage (`preflight.min_teacher_gain`): a teacher must beat the student start.

Why: a second distillation round only helps when its teachers are better than the student they distil into;
Nemotron 3 Ultra retrains its round-2 teachers until they beat the round-1 student. A round-2 teacher that is not
better (a short RL run from a strong student can even lose ground) turns distillation into a pull backwards, and
the run spends its whole budget before the report shows it. The held-out scores every finished stage already
records (`mopd.json`'s `metrics.eval`, on the recipe's shared held-out prompts) answer the question before step 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..core.errors import StageError
from ..core.run_dir import LINEAGE
from ..models.checkpoint import read_lineage
from .resolved import ResolvedStage


def held_out_scores(checkpoint: str | Path | None) -> dict[str, float] | None:
    """{domain: held-out score} recorded in a finished checkpoint's lineage, or None (an external model, or no
    eval recorded)."""
    if not checkpoint or not (Path(checkpoint) / LINEAGE).is_file():
        return None
    try:
        ev = read_lineage(Path(checkpoint)).get("metrics", {}).get("eval", {})
    except (OSError, ValueError, AttributeError):
        return None
    out = {str(d): float(v["score"]) for d, v in ev.items() if isinstance(v, dict)
           and isinstance(v.get("score"), int | float) and math.isfinite(v["score"])} if isinstance(ev, dict) else {}
    return out or None


def teacher_gains(ctx: ResolvedStage) -> dict[str, dict[str, Any]]:
    """domain -> {teacher, teacher_score, start_score, gain} for every routed domain (scores None where unknown)."""
    start = held_out_scores(ctx.init_path) or {}
    out: dict[str, dict[str, Any]] = {}
    for domain, name in sorted(ctx.teacher_of_domain.items()):
        scores = held_out_scores(ctx.teachers[name].checkpoint) or {}
        t, s = scores.get(domain), start.get(domain)
        out[domain] = {"teacher": name, "teacher_score": t, "start_score": s,
                       "gain": None if t is None or s is None else t - s}
    return out


def check_teacher_gain(ctx: ResolvedStage, margin: float) -> dict[str, dict[str, Any]]:
    """The gains, or a one-line StageError naming every teacher that does not beat the start by `margin` (or
    whose score, or the start's, is not recorded)."""
    gains = teacher_gains(ctx)
    problems = []
    for domain, g in gains.items():
        if g["gain"] is None:
            which = "teacher" if g["teacher_score"] is None else "start"
            problems.append(f"{g['teacher']!r} on {domain}: no held-out score recorded for the {which}")
        elif g["gain"] < margin:
            problems.append(f"{g['teacher']!r} on {domain}: {g['teacher_score']:.3f} vs start "
                            f"{g['start_score']:.3f} (gain {g['gain']:+.3f})")
    if problems:
        raise StageError(f"stage {ctx.name!r}: teachers must beat the start ({ctx.init_ref}) by "
                         f"min_teacher_gain {margin:g}: " + "; ".join(problems))
    return gains
