"""Run a recipe's stage DAG: skip what is finished, resume what was interrupted, record lineage, report.

A stage's identity is the hash of its settings and its parents' identities, so a rerun skips finished stages,
and changing one teacher reruns only what depends on it. A stage directory whose identity no longer matches is
moved aside to `.superseded/` (never deleted), so nothing already saved is lost.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from .. import __version__
from ..core.run_dir import METRICS, RECIPE_COPY, RUN_JSON
from ..core.schema import MOPDStage
from ..models.checkpoint import write_json_atomic
from ..recipe.identity import stage_identities
from ..recipe.load import LoadedRecipe
from ..recipe.resources import precision_warnings
from ..stages.resumable import supersede
from .learner_group import check_local
from .local_executor import LocalExecutor, check_local_gpus, warn_line
from .ray_executor import RayExecutor, ray_cluster
from .run_lock import RunLockedError, run_lock
from .scheduler import Executor, schedule
from .stage_step import storage_errors
from .tracking_run import Trackers, run_trackers

__all__ = ["RunLockedError", "busy_seconds", "report_block", "run_recipe"]

RUN_STARTED = "run_started_at"  # a stage entry's: when the run that computed the stage started (epoch seconds)


def report_block(loaded: LoadedRecipe) -> dict | None:
    recipe = loaded.recipe
    mopd = [n for n in loaded.order if isinstance(recipe.stages[n], MOPDStage)]
    if not mopd:
        return None
    student = recipe.report.student or mopd[-1]
    s: MOPDStage = recipe.stages[student]
    return {"start": s.init, "student": student, "teachers": dict(s.teachers),
            "min_teacher_gain": recipe.report.min_teacher_gain}


def run_recipe(loaded: LoadedRecipe, out: Path, console: Console | None = None, *, executor: str | None = None,
               address: str | None = None, threads: int | None = None) -> dict | None:
    """Run every stage in dependency order; returns the summary (None if the recipe has no mopd stage).

    `executor` (default: the recipe's `executor`): local runs the stages one after another in this process; ray
    runs each stage whose parents finished as a Ray task (on the cluster at `address`, or a local instance),
    with `threads` torch threads per task (default: the stage's `resources.cpus`). Holds the run directory's
    lock throughout (`run_lock`): a second run into it fails at once, in one line."""
    executor = executor or loaded.recipe.executor
    with ExitStack() as stack:
        stack.enter_context(EXECUTORS[executor].setup(loaded, address))  # one line before compute
        stack.enter_context(run_lock(Path(out)))
        stack.enter_context(storage_errors("run", Path(out)))
        trackers = stack.enter_context(run_trackers(loaded, Path(out)))
        summary = _run_locked(loaded, Path(out), console or Console(), trackers, executor, threads)
        trackers.summary(summary)  # experiment trackers: final evals and the report's numbers
        return summary


def _run_locked(loaded: LoadedRecipe, out: Path, console: Console, trackers: Trackers, executor: str = "local",
                threads: int | None = None) -> dict | None:
    recipe = loaded.recipe
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = stage_identities(loaded)
    run_path = out / RUN_JSON
    previous = _previous_run(run_path, out)
    # a rerun that stops early must not forget what an earlier run finished: start from its entries (same
    # identity only); each stage this run reaches replaces its own
    stages_info: dict[str, dict] = {
        n: v for n, v in previous.get("stages", {}).items() if isinstance(v, dict) and v.get("identity") == ids.get(n)
    }
    start_time = time.time()

    def write_run_json() -> None:
        write_json_atomic(run_path, {
            "recipe": recipe.name,
            "recipe_path": str(loaded.path),  # as given: the report names it so, not by this machine's absolute path
            "seed": recipe.seed,
            "version": __version__,
            "executor": executor,
            "wall_seconds": round(busy_seconds(stages_info.values()), 2),
            "order": loaded.order,
            "stages": stages_info,
            "report": report_block(loaded),
        })

    # the resolved recipe next to its results, so a run directory says what produced it
    if loaded.path.resolve() != (out / RECIPE_COPY).resolve():
        shutil.copyfile(loaded.path, out / RECIPE_COPY)

    for msg in [*loaded.warnings, *precision_warnings(recipe)]:  # before any stage spends compute
        warn_line(console, msg)

    def record(name: str, info: dict) -> None:
        # the start of the run that computed the stage: this one, or for a skipped stage the earlier one
        since = start_time if info.get("status") != "cached" else _seconds(stages_info.get(name, {}).get(RUN_STARTED))
        stages_info[name] = info if since is None else {**info, RUN_STARTED: round(since, 3)}
        write_run_json()
        trackers.replay(name, out / name / METRICS)  # what the trackers lack: cached, merge and eval stages, Ray
        trackers.samples(name, out / name)  # its logged rollouts (`log_samples`) as the trackers' tables

    schedule(loaded, EXECUTORS[executor].make(loaded, out, ids, console, trackers, threads), stages_info, record)
    console.print(f"ran {recipe.name} in {time.time() - start_time:.1f}s -> {out}", markup=False)
    if report_block(loaded) is None:
        console.print("no mopd stage in this recipe: report skipped")
        return None
    from ..report import build_report

    with storage_errors("report", out):
        summary = build_report(out)
    for msg in summary.get("warnings", []):  # a domain left out of the normalized score, said where it is read
        warn_line(console, msg)
    return summary


def busy_seconds(entries: Iterable[dict]) -> float:
    """The run's wall time, from run.json's stage entries: the union of the spans from the start of the run that
    computed each stage (`run_started_at`) to the stage's end, overlapping spans counted once.

    Why not the sum of the stages' times: under the Ray executor independent stages run at the same time, and
    their sum is the compute spent, not the time the run took. Why from the run's start rather than the stage's:
    the time between stages (the driver's work, a Ray worker starting) is part of the run's wall time too. A
    rerun that skips finished stages keeps the spans of the runs that computed them, and the time between an
    interrupted run and its resumption, when nothing ran, is not counted; a resumed stage's span reaches back
    over the checkpointed seconds its `wall_seconds` includes. An entry without `run_started_at` (an older
    run.json) spans its own `wall_seconds`, and one without a usable `ended_at` counts them on its own; entries
    are read from run.json, so a value that is not a finite number counts as nothing."""
    spans: list[tuple[float, float]] = []
    unplaced = 0.0
    for entry in entries:
        wall, ended = _seconds(entry.get("wall_seconds")), _seconds(entry.get("ended_at"))
        if wall is None or wall < 0:
            continue
        if ended is None:
            unplaced += wall
            continue
        since = _seconds(entry.get(RUN_STARTED))
        spans.append((ended - wall if since is None else min(since, ended - wall), ended))
    total, reach = unplaced, -math.inf
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def _seconds(value: object) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


@dataclass(frozen=True)
class ExecutorKind:
    """One value of `executor:`: what it checks (and starts) before any compute, and how it is made."""

    setup: Callable[[LoadedRecipe, str | None], AbstractContextManager]  # (recipe, --address)
    make: Callable[[LoadedRecipe, Path, dict[str, str], Console, Trackers, int | None], Executor]


@contextmanager
def _local_setup(loaded: LoadedRecipe, address: str | None) -> Iterator[None]:
    check_local(loaded)  # a data-parallel learner's ranks are Ray tasks
    check_local_gpus(loaded)  # GPUs reserved that this process does not have
    yield


EXECUTORS: dict[str, ExecutorKind] = {
    "local": ExecutorKind(_local_setup, lambda loaded, out, ids, console, trackers, threads: LocalExecutor(
        loaded, out, ids, console, trackers.recorder)),
    # the extra, the address and the stages' resources
    "ray": ExecutorKind(ray_cluster, lambda loaded, out, ids, console, trackers, threads: RayExecutor(
        loaded, out, ids, console, threads=threads)),
}


def _previous_run(run_path: Path, out: Path) -> dict:
    """The run.json of an earlier run, or {}; one that is not a JSON object is moved aside to `.superseded/`
    (it is an output, rewritten by this run, but nothing saved is deleted)."""
    if not run_path.exists():
        return {}
    try:
        previous = json.loads(run_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        previous = None
    if isinstance(previous, dict) and isinstance(previous.get("stages", {}), dict):
        return previous
    supersede(run_path, out, "run.json-unreadable")
    return {}
