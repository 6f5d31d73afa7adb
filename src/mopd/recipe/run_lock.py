"""One run at a time per run directory: an advisory lock held for the whole `run_recipe`.

Why: two runs writing one directory interleave their metrics and checkpoints (one crashes, the other duplicates
rows). `flock` is released by the kernel on any exit, kill -9 included, so a crashed run never leaves the
directory locked; the lock file keeps the holder's process id for the error message.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".mopd.lock"
STAGE_LOCK_WAIT_S = 60.0  # how long a stage waits for an earlier writer of its directory to end


class RunLockedError(RuntimeError):
    """The run directory is unusable (held by another run, or not a writable directory); str() is one line."""


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold the lock of run directory `out` (created if missing) for the block."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = (out / LOCK_FILE).open("a+")
    except OSError as e:
        raise RunLockedError(f"{out}: cannot use it as a run directory ({e.strerror or e})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunLockedError(
            f"{out}: another mopd run (process {holder}) is using this run directory; wait for it to end or "
            "choose another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@contextmanager
def stage_lock(out: Path, stage: str, wait_s: float = STAGE_LOCK_WAIT_S) -> Iterator[None]:
    """Hold the lock of stage `stage` of run directory `out` while a Ray worker runs the stage (a file in the run
    directory: a stage that starts over clears its own directory).

    Why, beside the run's lock: killing `mopd run --executor ray` ends the driver and its Ray instance, but a
    stage's worker notices only seconds later and goes on training until then; the same command run again at
    once would start a second writer of that stage's checkpoints. The new worker waits for the old one to end
    (up to `wait_s`; the kernel releases the lock when it dies), then resumes from whatever it left.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = (out / f".mopd.stage.{stage}.lock").open("a+")
    except OSError as e:
        raise RunLockedError(f"stage {stage!r}: cannot use {out} ({e.strerror or e})") from None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise RunLockedError(
                    f"stage {stage!r}: process {holder} is still writing {out / stage} after {wait_s:.0f} s (a worker "
                    "of an earlier run?); end it, then run the command again") from None
            time.sleep(0.2)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
