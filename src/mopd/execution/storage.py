"""Telling a full, read-only or forbidden disk apart from a bug, so that it is one line and not a traceback.

Writers below us report a full disk in their own ways: Python's OSError with ENOSPC, safetensors'
`SafetensorError("... No space left on device (os error 28)")`, and torch.save's
`RuntimeError("[enforce fail at inline_container.cc] . unexpected pos ...")`, which does not say why at all. So
the test is the error's errno or text first and, failing that, the free space left where the run writes.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded")
LOW_SPACE_BYTES = 16 * 2**20


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def storage_problem(exc: BaseException, out: Path) -> str | None:
    """Why writing under `out` failed, in words, when `exc` is a storage problem; None when it is not."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        if any(t in str(e) for t in NO_SPACE_TEXT):
            return "No space left on device"
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return None
    if free < LOW_SPACE_BYTES:
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        return f"the file system holding {out} has {free:,} bytes free ({exc.__class__.__name__}: {first})"
    return None
