"""One run at a time per run directory: an advisory lock held for the whole `run_recipe`.

Why: two runs writing one directory interleave their metrics and checkpoints (one crashes, the other duplicates
rows). `flock` is released by the kernel on any exit, kill -9 included, so a crashed run never leaves the
directory locked; the lock file keeps the holder's process id for the error message.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".mopd.lock"


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
