"""Which resumable checkpoint a stage resumes from, and what happens to one that fails verification.

A stage keeps its last two resumable checkpoints: a crash, a full disk or a sync tool can leave the newest one
truncated, and with only one there would be nothing to go back to. The newest that passes its checksums
(`models.integrity`) is resumed; each newer one that fails is moved to the run directory's `.superseded/`
(never deleted) with a warning naming the bad file, and the stage redoes the steps since the one it resumes.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..core.run_dir import CHECKPOINTS, SUPERSEDED
from ..models.checkpoint import read_lineage
from ..models.integrity import checkpoint_problem

KEEP_RESUMABLE = 2


def resumable_checkpoints(stage_dir: Path) -> list[Path]:
    """The stage's resumable checkpoint directories, oldest first (verified or not)."""
    return sorted(p for p in (Path(stage_dir) / CHECKPOINTS).glob("step-*") if p.is_dir())


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest resumable checkpoint that passes verification, or None."""
    return next((p for p in reversed(resumable_checkpoints(stage_dir)) if checkpoint_problem(p) is None), None)


def supersede(path: Path, run_dir: Path, label: str) -> Path:
    """Move `path` into `run_dir/.superseded/` under a name that says what it was; returns where it went."""
    _superseded_dir(Path(run_dir) / SUPERSEDED)
    return _move_into(path, Path(run_dir) / SUPERSEDED, label)


def _move_into(path: Path, folder: Path, label: str) -> Path:
    dest = folder / f"{label}-{int(time.time())}"
    n = 1
    while dest.exists() or dest.is_symlink():
        dest = dest.with_name(f"{label}-{int(time.time())}-{n}")
        n += 1
    os.replace(path, dest)
    return dest


def _superseded_dir(folder: Path) -> None:
    """Make `.superseded/` a directory. Something else in its place (a file, a link) is itself kept, moved into
    the new directory, rather than blocking every recovery until someone removes it by hand."""
    if folder.is_dir() and not folder.is_symlink():
        return
    if folder.exists() or folder.is_symlink():
        aside = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        os.replace(folder, aside)
        folder.mkdir()
        _move_into(aside, folder, f"{folder.name}-was-not-a-directory")
    folder.mkdir(parents=True, exist_ok=True)


def resume_point(stage_dir: Path, stage: str, warn: Callable[[str], None] | None) -> Path | None:
    """The newest resumable checkpoint that verifies (None: the stage starts over). Each newer one that fails is
    moved to `.superseded/` with a warning naming the file, so a later resume cannot pick it up. Every checkpoint
    is read (hashed) at most once."""
    stage_dir = Path(stage_dir)
    failed: list[tuple[Path, str]] = []
    keep = None
    for ckpt in reversed(resumable_checkpoints(stage_dir)):
        if (problem := checkpoint_problem(ckpt)) is None:
            keep = ckpt
            break
        failed.append((ckpt, problem))
    fallback = f"resuming from {keep.name}" if keep else "no verified checkpoint left: the stage starts over"
    for ckpt, problem in failed:
        dest = supersede(ckpt, stage_dir.parent, f"{stage_dir.name}-{ckpt.name}-unverified")
        if warn:
            warn(f"stage {stage!r}: resumable checkpoint {ckpt.name} failed verification ({problem}); "
                 f"moved to {dest}; {fallback}")
    return keep


def prune_resumable(stage_dir: Path) -> None:
    """Keep the last `KEEP_RESUMABLE` resumable checkpoints."""
    for old in resumable_checkpoints(stage_dir)[:-KEEP_RESUMABLE]:
        shutil.rmtree(old, ignore_errors=True)


def checkpointed_seconds(ckpt: Path | None) -> float:
    """Training seconds that a resumable checkpoint already holds (0 without one).

    Why: a resumed stage must report the time it took in all, not that of the invocation that finished it:
    the comparison table charges each method its stages' wall time, and the metrics' `time` axis (sample
    efficiency against wall time) would otherwise restart at zero at the resume.
    """
    return float(read_lineage(ckpt)["metrics"].get("elapsed_seconds", 0.0)) if ckpt else 0.0
