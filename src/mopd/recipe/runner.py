"""Run a recipe's stage DAG: skip what is finished, resume what was interrupted, record lineage, report.

A stage's identity is the hash of its settings and its parents' identities, so a rerun skips finished stages,
and changing one teacher reruns only what depends on it. A stage directory whose identity no longer matches is
moved aside to `.superseded/` (never deleted), so nothing already saved is lost.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from .. import __version__
from ..core.errors import StageError
from ..core.schema import MOPDStage
from ..models.checkpoint import read_lineage, write_json_atomic
from ..models.integrity import stage_output_problem
from ..stages.driver import FINAL, METRICS
from ..stages.resumable import checkpointed_seconds, supersede
from ..stages.run import run_stage
from .identity import stage_identities
from .load import LoadedRecipe
from .progress import stage_progress
from .refs import init_ref, stage_domains
from .resolve import resolve_stage
from .resources import precision_warnings
from .run_lock import RunLockedError, run_lock
from .storage import storage_problem
from .tracking_run import Trackers, run_trackers

__all__ = ["RunLockedError", "report_block", "run_recipe"]


def report_block(loaded: LoadedRecipe) -> dict | None:
    recipe = loaded.recipe
    mopd = [n for n in loaded.order if isinstance(recipe.stages[n], MOPDStage)]
    if not mopd:
        return None
    student = recipe.report.student or mopd[-1]
    s: MOPDStage = recipe.stages[student]
    return {"start": s.init, "student": student, "teachers": dict(s.teachers)}


def _finished(stage_dir: Path, identity: str, warn: Callable[[str], None]) -> bool:
    """Whether the stage's outputs (its final directory, kept snapshots and metrics log) are on disk with
    `identity` and pass their checksums. Outputs that fail are moved to `.superseded/` (never deleted), with a warning naming the
    file, and the stage runs again."""
    final = stage_dir / FINAL
    if not final.exists():
        return False
    problem = stage_output_problem(stage_dir)
    if problem is None:
        return read_lineage(final).get("identity") == identity
    dest = supersede(stage_dir, stage_dir.parent, f"{stage_dir.name}-unverified")
    warn(f"stage {stage_dir.name!r}: its finished output failed verification ({problem}); moved to {dest}; "
         "the stage runs again")
    return False


def _archive_if_stale(stage_dir: Path, identity: str, out: Path) -> None:
    if not stage_dir.exists():
        return
    if _recorded_identity(stage_dir) != identity:
        supersede(stage_dir, out, f"{stage_dir.name}-{_recorded_identity(stage_dir)}")


def _recorded_identity(stage_dir: Path) -> str:
    """The identity `stage.json` records, or "unknown" when it is missing or unreadable."""
    try:
        marker = json.loads((stage_dir / "stage.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "unknown"
    identity = marker.get("identity") if isinstance(marker, dict) else None
    return identity if isinstance(identity, str) and re.fullmatch(r"[0-9a-f]{16}", identity) else "unknown"


def run_recipe(loaded: LoadedRecipe, out: Path, console: Console | None = None) -> dict | None:
    """Run every stage in dependency order; returns the summary (None if the recipe has no mopd stage).

    Holds the run directory's lock throughout (`run_lock`): a second run into it fails at once, in one line."""
    with run_lock(Path(out)), _storage_errors("run", Path(out)), run_trackers(loaded, Path(out)) as trackers:
        summary = _run_locked(loaded, Path(out), console or Console(), trackers)
        trackers.summary(summary)  # experiment trackers: final evals and the report's numbers
        return summary


def _run_locked(loaded: LoadedRecipe, out: Path, console: Console, trackers: Trackers) -> dict | None:
    recipe = loaded.recipe
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = stage_identities(loaded)
    run_path = out / "run.json"
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
            "recipe_path": str(loaded.path.resolve()),
            "seed": recipe.seed,
            "version": __version__,
            "wall_seconds": round(sum(v.get("wall_seconds", 0.0) for v in stages_info.values()), 2),
            "order": loaded.order,
            "stages": stages_info,
            "report": report_block(loaded),
        })

    # the resolved recipe next to its results, so a run directory says what produced it
    if loaded.path.resolve() != (out / "recipe.yaml").resolve():
        shutil.copyfile(loaded.path, out / "recipe.yaml")

    def warn(msg: str, console: Console = console) -> None:
        console.print(f"[bold yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)

    for msg in precision_warnings(recipe):  # before any stage spends compute
        warn(msg)
    with stage_progress(console) as progress:
        for name in loaded.order:
            stage = recipe.stages[name]
            stage_dir = out / name
            info = {
                "kind": stage.kind,
                "init": init_ref(stage),
                "teachers": dict(teachers) if isinstance(teachers := getattr(stage, "teachers", None), dict) else None,
                "domains": stage_domains(stage, recipe),
                "identity": ids[name],
            }
            total = getattr(stage, "steps", 1)
            task = progress.add_task(name, total=total, info="")
            with _storage_errors(f"stage {name!r}", out):
                if _finished(stage_dir, ids[name], lambda msg: warn(msg, progress.console)):
                    prior = stages_info.get(name, {})  # the earlier run's entry, kept only with the same identity
                    info["wall_seconds"] = prior.get("wall_seconds", 0.0)
                    info["status"] = "cached"
                    progress.update(task, completed=total, info="[dim]finished earlier (same identity): skipped")
                else:
                    _archive_if_stale(stage_dir, ids[name], out)
                    stage_dir.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(stage_dir / "stage.json", {"identity": ids[name], "kind": stage.kind})
                    ctx = resolve_stage(
                        loaded, name, out, ids,
                        on_progress=lambda step, tot, m, task=task: progress.update(
                            task, completed=step, info=_progress_info(m)),
                        on_warning=lambda msg: warn(msg, progress.console),
                        on_record=trackers.recorder(name),
                    )
                    t0 = time.time() - checkpointed_seconds(stage_dir)  # an interrupted stage's earlier time counts
                    run_stage(ctx)
                    info["wall_seconds"] = round(time.time() - t0, 2)
                    info["status"] = "ran"
                    progress.update(task, completed=total)
            stages_info[name] = info
            write_run_json()
            trackers.replay(name, stage_dir / METRICS)  # what the trackers lack: cached, merge and eval stages

    console.print(f"ran {recipe.name} in {time.time() - start_time:.1f}s -> {out}")
    if report_block(loaded) is None:
        console.print("no mopd stage in this recipe: report skipped")
        return None
    from ..report import build_report

    with _storage_errors("report", out):
        return build_report(out)


@contextmanager
def _storage_errors(what: str, out: Path) -> Iterator[None]:
    """A full, read-only or forbidden disk under `what` becomes one StageError line; anything else propagates."""
    try:
        yield
    except Exception as e:
        if isinstance(e, StageError) or (why := storage_problem(e, out)) is None:
            raise
        raise StageError(f"{what}: cannot write under {out}: {why}; finished stages and verified checkpoints are "
                         "kept: free space (or fix permissions) and run the same command again") from None


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


def _progress_info(m: dict[str, float]) -> str:
    parts = []
    for key in ("loss", "reward/mean", "mopd/reverse_kl"):
        if key in m:
            parts.append(f"{key.split('/')[0] if key != 'mopd/reverse_kl' else 'rkl'}={m[key]:.3f}")
    return " ".join(parts)
