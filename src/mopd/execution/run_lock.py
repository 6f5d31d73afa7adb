"""One writer at a time: an advisory lock per run directory, held for the whole `run_recipe`, and one per stage,
held by the Ray worker that runs the stage.

Why: two runs writing one directory interleave their metrics and checkpoints (one crashes, the other duplicates
rows). `flock` is released by the kernel on any exit, kill -9 included, so a crashed run never leaves the
directory locked; the lock file keeps the holder's process id for the error message.

Why a stage lock beside the run's, and why Ray's writers wait: killing `mopd run --executor ray` (or a `mopd
sweep` on Ray) ends the driver and its Ray instance, but a worker notices only seconds later and goes on training
until then; the same command run again at once would start a second writer. A stage's worker (and a sweep
point's task, for its run directory) waits for the old one to end (up to `RAY_WRITER_WAIT_S`), then resumes from
whatever it left. A second `mopd run` into a directory in use is a user's mistake: it fails at once.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO

LOCK_FILE = ".mopd.lock"
RAY_WRITER_WAIT_S = 60.0  # how long a Ray worker waits for an earlier writer of its directory to end


class RunLockedError(RuntimeError):
    """The run directory is unusable (held by another run, or not a writable directory); str() is one line."""


def _flock(handle: IO[str], wait_s: float) -> str | None:
    """Take the exclusive lock, polling up to `wait_s`; None when taken, else the holder's process id."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.seek(0)
                return handle.read().strip() or "unknown"
            time.sleep(0.2)


@contextmanager
def _held(lock: Path, wait_s: float, unusable: str, busy: str) -> Iterator[None]:
    """Hold `lock` for the block; `unusable` / `busy` (with {error} / {holder}) are the one-line refusals."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = lock.open("a+")
    except OSError as e:  # the lock itself named when it is the culprit (a directory in its place)
        error = e.strerror or str(e)
        error = f"{error}: {lock}" if e.filename and Path(e.filename) == lock else error
        raise RunLockedError(unusable.format(error=error)) from None
    if (holder := _flock(handle, wait_s)) is not None:
        handle.close()
        raise RunLockedError(busy.format(holder=holder)) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def run_lock(out: Path, wait_s: float = 0.0) -> AbstractContextManager[None]:
    """Hold the lock of run directory `out` (created if missing) for the block."""
    return _held(out / LOCK_FILE, wait_s, f"{out}: cannot use it as a run directory ({{error}})",
                 f"{out}: another mopd run (process {{holder}}) is using this run directory; wait for it to end or "
                 "choose another --out")


def stage_lock(out: Path, stage: str, wait_s: float = RAY_WRITER_WAIT_S) -> AbstractContextManager[None]:
    """Hold the lock of stage `stage` of run directory `out` while a Ray worker runs the stage (a file in the run
    directory: a stage that starts over clears its own directory)."""
    return _held(out / f".mopd.stage.{stage}.lock", wait_s, f"stage {stage!r}: cannot use {out} ({{error}})",
                 f"stage {stage!r}: process {{holder}} is still writing {out / stage} after {wait_s:.0f} s (a worker "
                 "of an earlier run?); end it, then run the command again")
