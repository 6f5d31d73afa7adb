"""Read what a run directory holds for its report: run.json, each stage's metrics log and its verified final eval.

Every reader checks what it reads (one-line ValueError, or a RuntimeWarning and the file left out) instead of
trusting a directory a crash, a sync tool or a hand edit may have changed; a stage's final eval is read only when
its outputs pass their checksums (`models.integrity.stage_output_problem`).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from mopd.models.integrity import stage_output_problem

from ..core.run_dir import FINAL, LINEAGE, RUN_JSON

REQUIRED_RUN_KEYS = ("recipe", "stages", "report")
REQUIRED_REPORT_KEYS = ("start", "student", "teachers")


def load_run(run_dir: Path) -> dict[str, Any]:
    """Read and check RUN/run.json; raises a one-line ValueError naming the file."""
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise ValueError(f"{path}: not found (is this a run directory?)")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(run, dict):
        raise ValueError(f"{path}: expected a JSON object at top level")
    missing = [k for k in REQUIRED_RUN_KEYS if k not in run]
    rep = run.get("report")
    if isinstance(rep, dict):
        missing += [f"report.{k}" for k in REQUIRED_REPORT_KEYS if k not in rep]
    elif "report" in run:
        raise ValueError(f"{path}: 'report' must be an object with keys {', '.join(REQUIRED_REPORT_KEYS)}")
    if missing:
        raise ValueError(f"{path}: missing required key(s): {', '.join(missing)}")
    stages = run["stages"]
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        raise ValueError(f"{path}: 'stages' must map stage names to objects")
    if not isinstance(rep["teachers"] or {}, dict):
        raise ValueError(f"{path}: 'report.teachers' must map domains to teacher stages")
    return run


def _as_step(x: Any) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return None


def finite_number(x: Any) -> float | None:
    """x as a finite float, or None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Parsed lines of a metrics.jsonl; malformed lines (bad JSON, not an object, no integer "step")
    are skipped with one RuntimeWarning per file."""
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            step = _as_step(obj.get("step")) if isinstance(obj, dict) else None
            if step is None:
                bad.append(lineno)
                continue
            obj["step"] = step
            rows.append(obj)
    if bad:
        warnings.warn(
            f"{path}: skipped {len(bad)} malformed line(s) (first at line {bad[0]})",
            RuntimeWarning,
            stacklevel=2,
        )
    return rows


def curves_from_rows(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """metric key -> [(step, value)] sorted by step; numeric finite values only, eval/* keys left out.
    When a step is logged twice (a resumed stage), the later line wins."""
    by_key: dict[str, dict[int, float]] = {}
    for row in rows:
        for k, v in row.items():
            val = finite_number(v)
            if k == "step" or k.startswith("eval/") or val is None:
                continue
            by_key.setdefault(k, {})[row["step"]] = val
    return {k: sorted(d.items()) for k, d in by_key.items()}


def final_problem(stage_dir: Path) -> str | None:
    """One line naming the file of a finished stage's outputs (final checkpoint, snapshots, metrics log) that
    fails its checksums, or None (intact, or the stage has no final output)."""
    return stage_output_problem(stage_dir) if (Path(stage_dir) / FINAL / LINEAGE).is_file() else None


AGENT_KEYS = ("tool_call_rate", "episode_length")


def eval_standard_error(rewards) -> float | None:
    """The standard error of a held-out mean score: the per-prompt rewards' sample standard deviation / sqrt(n)."""
    if not isinstance(rewards, list) or len(rewards) < 2:
        return None
    xs = [x for x in (finite_number(r) for r in rewards) if x is not None]
    if len(xs) < 2:
        return None
    mean = sum(xs) / len(xs)
    return (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5


def read_final_eval(stage_dir: Path) -> dict[str, dict[str, float | None]] | None:
    """{domain: {"score", "accuracy"} (+ "tool_call_rate", "episode_length" on a tool-use domain)} from
    <stage>/final/mopd.json; None when the stage is not finished or its
    final directory fails verification (with a warning naming the file: see `final_problem`)."""
    path = Path(stage_dir) / FINAL / LINEAGE
    if not path.is_file():
        return None
    if problem := final_problem(stage_dir):
        warnings.warn(f"{problem}: stage treated as unfinished", RuntimeWarning, stacklevel=2)
        return None
    obj = json.loads(path.read_text(encoding="utf-8"))
    metrics = obj.get("metrics") if isinstance(obj, dict) else None
    ev = metrics.get("eval") if isinstance(metrics, dict) else None
    out: dict[str, dict[str, float | None]] = {}
    if isinstance(ev, dict):
        for domain, d in ev.items():
            if isinstance(d, dict):
                out[str(domain)] = {"score": finite_number(d.get("score")), "accuracy": finite_number(d.get("accuracy")),
                                    "se": eval_standard_error(d.get("rewards"))}
                for key in AGENT_KEYS:  # a tool-use domain's held-out episodes
                    if (value := finite_number(d.get(key))) is not None:
                        out[str(domain)][key] = value
    return out
