"""One comparison from several seeds: each seed's numbers averaged, the intervals attached to their cells, and the
sample-efficiency curves averaged with a band.

Why apart from `report.compare`: that module reads one run directory; this one only combines plain results
(what `_seed_result` returns per seed, what `compare_intervals` returns), so the arithmetic is tested on known
numbers without any run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mopd.report.stats import LEVEL, RESAMPLES, mean_interval


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean over seeds; None when any seed has no value (a method undefined in one seed is not averaged over
    the others silently)."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def _curve_mean(curves: Sequence[Sequence[Sequence[float]]]) -> tuple[list[list[float]], list[list[float]]]:
    """Mean curve and its band ([x, lo, hi]) at the sample counts every seed evaluated at."""
    common = set.intersection(*({float(p[0]) for p in c} for c in curves)) if curves else set()
    points, band = [], []
    for x in sorted(common):
        ys = [next(float(p[1]) for p in c if float(p[0]) == x) for c in curves]
        points.append([x, sum(ys) / len(ys)])
        if len(ys) > 1 and (ci := mean_interval(np.asarray(ys))) is not None:
            band.append([x, ci[0], ci[1]])
    return points, band


def mean_over_seeds(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The comparison whose every number is the mean over seeds; each method also keeps its per-seed normalized
    scores, and each curve its band over seeds (`sample_efficiency_bands`)."""
    first = per_seed[0]
    domains = list(first["teachers"])
    methods = {}
    for label, m in first["methods"].items():
        ms = [r["methods"][label] for r in per_seed]
        methods[label] = {
            **m,
            "normalized_score": _mean([x["normalized_score"] for x in ms]),
            "domains": {d: {k: _mean([x["domains"][d][k] for x in ms]) for k in ("score", "recovery")}
                        for d in domains},
            "samples": round(sum(x["samples"] for x in ms) / len(ms)),
            "other_samples": round(sum(x["other_samples"] for x in ms) / len(ms)),
            "wall_seconds": round(sum(x["wall_seconds"] for x in ms) / len(ms), 2),
            "per_seed": [x["normalized_score"] for x in ms],
        }
    curves, bands = {}, {}
    for label in first["sample_efficiency"]:
        curves[label], bands[label] = _curve_mean([r["sample_efficiency"].get(label, []) for r in per_seed])
    return {
        "recipe": first["recipe"],
        "start": {"stage": first["start"]["stage"],
                  "domains": {d: _mean([r["start"]["domains"].get(d) for r in per_seed]) for d in domains}},
        # a domain whose teacher gained too little in any seed is marked so; each seed's warning is kept
        "teachers": {d: {"stage": t["stage"], "score": _mean([r["teachers"][d]["score"] for r in per_seed]),
                         **next(({"status": r["teachers"][d]["status"]} for r in per_seed
                                 if "status" in r["teachers"][d]), {})}
                     for d, t in first["teachers"].items()},
        "min_teacher_gain": first.get("min_teacher_gain"),
        "warnings": [f"seed {i + 1}: {w}" for i, r in enumerate(per_seed) for w in r.get("warnings", [])],
        "methods": methods,
        "sample_efficiency": curves,
        "sample_efficiency_bands": bands,
    }


def add_intervals(result: dict[str, Any], intervals: dict[str, Any], reference: str | None) -> None:
    """Attach `compare_intervals`' cells to the result's numbers (in place); nothing when no stage has per-prompt
    rewards."""
    scores = intervals["scores"]
    if not scores:
        return
    result["intervals"] = {"level": LEVEL, "resamples": RESAMPLES, "seeds": intervals["seeds"],
                           "prompts": intervals["prompts"], "reference": reference,
                           "over": "seeds and held-out prompts" if intervals["seeds"] > 1 else "held-out prompts"}
    start = result["start"]
    if start["stage"] in scores:
        start["intervals"] = scores[start["stage"]]
    for d, t in result["teachers"].items():
        if t["stage"] in scores:
            t["interval"] = scores[t["stage"]][d]
    ref = result["methods"].get(reference or "")
    for label, m in result["methods"].items():
        for d, cell in m["domains"].items():
            if m["stage"] in scores:
                cell["score_interval"] = scores[m["stage"]][d]
        cells = intervals["methods"].get(label)
        if cells is None:
            continue
        for d, cell in m["domains"].items():
            cell["recovery_interval"] = cells["recovery"][d]
        m["normalized_interval"] = cells["normalized"]
        diff = cells["vs_reference"]
        if diff is not None and ref is not None and None not in (m["normalized_score"], ref["normalized_score"]):
            m["vs_reference"] = {"reference": reference,
                                 "difference": m["normalized_score"] - ref["normalized_score"], **diff}
