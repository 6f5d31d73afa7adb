"""One stage of a run, as every executor runs it: skip it if finished, else archive a stale directory, mark it,
resolve it and run it (resuming from its newest verified checkpoint).

Why one function: the local executor calls it in the driver process, the Ray executor in a worker, so stage
identity, skipping, archiving and resume are one code path whatever runs the stages. It takes plain values and
callbacks and returns the stage's run.json entry (a plain dict), so it crosses a process boundary as is.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.errors import StageError
from ..core.run_dir import FINAL, STAGE_JSON
from ..core.schema import ExecutorName
from ..models.checkpoint import read_lineage, write_json_atomic
from ..models.integrity import stage_output_problem
from ..recipe.load import LoadedRecipe
from ..stages.resolved import ResolvedStage, StageHooks
from ..stages.resumable import checkpointed_seconds, latest_checkpoint, supersede
from ..stages.run import run_stage
from .resolve import resolve_stage
from .storage import storage_problem

Warn = Callable[[str], None]


def stage_entry(loaded: LoadedRecipe, name: str, ids: dict[str, str]) -> dict:
    """The run.json entry of a stage before it runs: kind, start, teachers, domains, identity."""
    stage = loaded.recipe.stages[name]
    teachers = getattr(stage, "teachers", None)
    return {
        "kind": stage.kind,
        "init": loaded.facts[name].init,
        "teachers": dict(teachers) if isinstance(teachers, dict) else None,
        "domains": list(loaded.facts[name].domains),
        "identity": ids[name],
    }


def run_stage_step(
    loaded: LoadedRecipe,
    name: str,
    out: Path,
    ids: dict[str, str],
    prior: dict,
    *,
    hooks: StageHooks,
    run: Callable[[ResolvedStage], Path] = run_stage,
    executor: ExecutorName = "local",
) -> dict:
    """Run stage `name` into `out / name` unless it finished with its identity; returns its run.json entry with
    `status` (cached / ran), `wall_seconds` and the wall-clock `started_at` / `ended_at` (epoch seconds).

    `prior` is the earlier run's entry of this stage (same identity only, else {}): a cached stage keeps its
    times. Disk errors become one StageError line naming the stage."""
    stage_dir = Path(out) / name
    info = stage_entry(loaded, name, ids)
    with storage_errors(f"stage {name!r}", Path(out)):
        if finished(stage_dir, ids[name], hooks.warn):
            info["status"] = "cached"
            for key in ("wall_seconds", "started_at", "ended_at"):
                info[key] = prior.get(key, 0.0 if key == "wall_seconds" else None)
            return info
        archive_if_stale(stage_dir, ids[name], Path(out))
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stage_dir / STAGE_JSON, {"identity": ids[name], "kind": info["kind"]})
        # a stage's rollout / learner workers are Ray actors only under the Ray executor
        ctx = resolve_stage(loaded, name, Path(out), ids, executor=executor, hooks=hooks)
        started = time.time()
        t0 = started - checkpointed_seconds(latest_checkpoint(stage_dir))  # an interrupted stage's time counts
        run(ctx)
        ended = time.time()
    info.update(status="ran", wall_seconds=round(ended - t0, 2), started_at=round(started, 3),
                ended_at=round(ended, 3))
    return info


def finished(stage_dir: Path, identity: str, warn: Warn) -> bool:
    """Whether the stage's outputs (its final directory, kept snapshots and metrics log) are on disk with
    `identity` and pass their checksums. Outputs that fail are moved to `.superseded/` (never deleted), with a
    warning naming the file, and the stage runs again."""
    final = stage_dir / FINAL
    if not final.exists():
        return False
    problem = stage_output_problem(stage_dir)
    if problem is None:
        recorded = read_lineage(final).get("identity")
        if recorded == identity:
            return True
        # a verified output of other settings (stage.json said otherwise): kept, not overwritten by the rerun
        dest = supersede(final, stage_dir.parent, f"{stage_dir.name}-{FINAL}-{_safe_label(recorded)}")
        warn(f"stage {stage_dir.name!r}: its finished output was made with other settings; moved to {dest}; the "
             "stage runs again")
        return False
    dest = supersede(stage_dir, stage_dir.parent, f"{stage_dir.name}-unverified")
    warn(f"stage {stage_dir.name!r}: its finished output failed verification ({problem}); moved to {dest}; "
         "the stage runs again")
    return False


def _safe_label(identity: object) -> str:
    """An identity read from a run directory (untrusted) as part of a file name: 16 hex digits, or `unknown`."""
    return identity if isinstance(identity, str) and re.fullmatch(r"[0-9a-f]{16}", identity) else "unknown"


def archive_if_stale(stage_dir: Path, identity: str, out: Path) -> None:
    """Move a stage directory saved under another identity to `.superseded/` (never deleted)."""
    if not stage_dir.exists():
        return
    if (recorded := recorded_identity(stage_dir)) != identity:
        supersede(stage_dir, out, f"{stage_dir.name}-{recorded}")


def recorded_identity(stage_dir: Path) -> str:
    """The identity `stage.json` records, or "unknown" when it is missing or unreadable."""
    try:
        marker = json.loads((stage_dir / STAGE_JSON).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "unknown"
    return _safe_label(marker.get("identity") if isinstance(marker, dict) else None)


@contextmanager
def storage_errors(what: str, out: Path) -> Iterator[None]:
    """A full, read-only or forbidden disk under `what` becomes one StageError line; anything else propagates."""
    try:
        yield
    except Exception as e:
        if isinstance(e, StageError) or (why := storage_problem(e, out)) is None:
            raise
        raise StageError(f"{what}: cannot write under {out}: {why}; finished stages and verified checkpoints are "
                         "kept: free space (or fix permissions) and run the same command again") from None
