"""Intervals for every cell of the comparison table, from the per-prompt rewards each stage's final evaluation
saved (`eval.evaluate` records them next to the mean), over one or more seeds' run directories.

A cell's interval resamples seeds and prompts together (`report.stats`); its evaluation standard error resamples
prompts only (seeds fixed): the part of the uncertainty that a larger held-out set would shrink. Recovery and the
normalized score are recomputed inside each replicate from that replicate's start, teacher and method scores, so
their intervals carry the start's and teachers' evaluation noise too. Each method's normalized score is compared
with the reference method's (MOPD) on the same replicates: a paired difference.

Stages without per-prompt rewards (runs made before they were recorded) get no interval: their cells show the
mean alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mopd.report.run_files import read_final_eval
from mopd.report.scores import MIN_TEACHER_GAIN, ROUNDOFF
from mopd.report.stats import (
    Draws,
    make_draws,
    over_seeds,
    paired_difference,
    percentile_interval,
    replicate_means,
    replicate_se,
)

from ..core.run_dir import FINAL, LINEAGE


def read_prompt_rewards(stage_dir: Path) -> dict[str, np.ndarray] | None:
    """{domain: per-prompt rewards} from a verified final/mopd.json; None when unfinished, unverified, or saved
    without per-prompt rewards."""
    if read_final_eval(stage_dir) is None:  # missing or failing verification (it warns)
        return None
    ev = json.loads((Path(stage_dir) / FINAL / LINEAGE).read_text()).get("metrics", {}).get("eval", {})
    out = {}
    for d, v in ev.items():
        rewards = v.get("rewards") if isinstance(v, dict) else None
        if isinstance(rewards, list) and rewards:
            out[str(d)] = np.asarray(rewards, dtype=float)
    return out or None


def _stacked(seed_dirs: Sequence[Path], stage: str, domains: Sequence[str]) -> dict[str, np.ndarray] | None:
    """{domain: (S, P)} over the seeds, or None unless every seed has the same prompts for every domain."""
    per_seed = [read_prompt_rewards(Path(d) / stage) for d in seed_dirs]
    if any(r is None or any(d not in r for d in domains) for r in per_seed):
        return None
    out = {}
    for d in domains:
        rows = [r[d] for r in per_seed]  # type: ignore[index]
        if len({x.size for x in rows}) != 1:
            return None
        out[d] = np.stack(rows)
    return out


def _cell(full: np.ndarray, prompts_only: np.ndarray) -> dict[str, Any]:
    ci = percentile_interval(full)
    return {"ci": None if ci is None else [ci[0], ci[1]], "se": replicate_se(prompts_only)}


def _recovery(method: np.ndarray, start: np.ndarray, teacher: np.ndarray, min_gain: float = MIN_TEACHER_GAIN,
              ) -> np.ndarray:
    """`scores.recovery` per replicate: NaN where that replicate's teacher gain is too small
    (`scores.gain_too_small`: not positive, or under `min_gain`)."""
    gain = teacher - start
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((gain > 0) & (gain >= min_gain - ROUNDOFF), (method - start) / gain, np.nan)


def _normalized(recoveries: list[np.ndarray]) -> np.ndarray:
    """Mean over the domains whose recovery is defined, NaN where none is (as `scores.normalized_score`)."""
    stack = np.stack(recoveries)
    defined = np.isfinite(stack)
    count = defined.sum(axis=0)
    total = np.where(defined, stack, 0.0).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def compare_intervals(seed_dirs: Sequence[Path], plan: dict[str, Any], reference: str | None) -> dict[str, Any]:
    """{"scores": {stage: {domain: cell}}, "methods": {label: {"recovery": {domain: cell}, "normalized": cell,
    "vs_reference": {"ci", "significant"} | None}}, "seeds": S, "prompts": {domain: P}}; a cell is
    {"ci": [lo, hi] | None, "se": evaluation standard error | None}. Empty "scores" when no stage has
    per-prompt rewards."""
    domains = list(plan["teachers"])
    stages = [plan["start"], *plan["teachers"].values(), *(m["stage"] for m in plan["methods"].values())]
    rewards = {s: r for s in dict.fromkeys(stages) if (r := _stacked(seed_dirs, s, domains)) is not None}
    sizes = {d: next((r[d].shape[1] for r in rewards.values()), 0) for d in domains}
    rewards = {s: r for s, r in rewards.items() if all(r[d].shape[1] == sizes[d] for d in domains)}
    out: dict[str, Any] = {"seeds": len(seed_dirs), "prompts": sizes, "scores": {}, "methods": {}}
    if not rewards:
        return out
    full = make_draws(len(seed_dirs), sizes)
    noise = make_draws(len(seed_dirs), sizes, seeds=False)

    def per_seed(stage: str, draws: Draws) -> dict[str, np.ndarray]:
        return {d: replicate_means(rewards[stage][d], draws.prompts[d]) for d in domains}

    scores = {s: (per_seed(s, full), per_seed(s, noise)) for s in rewards}
    for s, (f, n) in scores.items():
        out["scores"][s] = {d: _cell(over_seeds(f[d], full.seeds), over_seeds(n[d], noise.seeds)) for d in domains}
    start, teachers = plan["start"], plan["teachers"]
    min_gain = float(plan.get("min_teacher_gain", MIN_TEACHER_GAIN))
    if start not in scores or any(t not in scores for t in teachers.values()):
        return out
    normalized: dict[str, np.ndarray] = {}
    for label, m in plan["methods"].items():
        if m["stage"] not in scores:
            continue
        # per draw (full, prompts only): each domain's recovery per seed and replicate, (S, B)
        recs = [[_recovery(scores[m["stage"]][k][d], scores[start][k][d], scores[teachers[d]][k][d], min_gain)
                 for d in domains] for k in (0, 1)]
        cells = {d: _cell(over_seeds(recs[0][i], full.seeds), over_seeds(recs[1][i], noise.seeds))
                 for i, d in enumerate(domains)}
        normalized[label] = over_seeds(_normalized(recs[0]), full.seeds)
        out["methods"][label] = {"recovery": cells, "vs_reference": None,
                                 "normalized": _cell(normalized[label], over_seeds(_normalized(recs[1]), noise.seeds))}
    if reference in normalized:
        for label, reps in normalized.items():
            if label != reference:
                out["methods"][label]["vs_reference"] = paired_difference(reps, normalized[reference])
    return out
