"""A full or read-only disk (issue 15, item 8): one line naming the stage, nothing verified lost, and the same
command finishes the run once space is back. The real case runs `mopd` on a small tmpfs in a private mount
namespace (`unshare -m`, as root); the classification of the writers' errors is checked on its own everywhere."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mopd.execution.storage import storage_problem

from .bad_input_cases import BASE

SCRIPT = textwrap.dedent(
    """\
    set -u
    M="$1"; shift
    mount -t tmpfs -o size=150k tmpfs "$M"
    cp "$RECIPE" "$M/r.yaml"
    echo "== full"; "$@" run "$M/r.yaml" --out "$M/run" --threads 1 2>&1 | grep -v "━" ; echo "rc=${PIPESTATUS[0]}"
    ls "$M/run" | tr '\\n' ' '; echo
    mount -o remount,size=20m "$M"
    echo "== freed"; "$@" run "$M/r.yaml" --out "$M/run" --threads 1 2>&1 | grep -E "error|skipped|verification"
    echo "rc=${PIPESTATUS[0]}"
    mount -o remount,ro "$M"
    echo "== read-only"; "$@" run "$M/r.yaml" --out "$M/run2" --threads 1 2>&1; echo "rc=$?"
    """
)


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and mount namespaces (unshare -m) to make a tmpfs")
def test_a_full_then_freed_then_read_only_disk(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text(BASE)
    (tmp_path / "script.sh").write_text(SCRIPT)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mopd = [sys.executable, "-m", "mopd"]
    res = subprocess.run(["unshare", "-m", "bash", str(tmp_path / "script.sh"), str(mnt), *mopd],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RECIPE": str(tmp_path / "recipe.yaml")})
    full, freed, read_only = res.stdout.split("== ")[1:]
    assert "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr
    # full: one line naming a stage and the cause, exit 2; the stages before it are finished and kept
    errors = [x for x in full.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "rc=2" in full, full
    assert "cannot write under" in errors[0] and "No space left on device" in errors[0], errors[0]
    failed = errors[0].split("'")[1]
    order = ["base", "teacher_add", "teacher_rev", "student"]
    assert failed in order, errors[0]
    # freed: the stages finished before the failure are verified and skipped, the rest runs, exit 0
    assert "rc=0" in freed and "error" not in freed, freed
    assert all(f"{s} " in freed for s in order[: order.index(failed)]), freed
    assert "failed verification" not in freed
    # read-only: one line before any work
    lines = [x for x in read_only.splitlines()[1:] if x.strip() and not x.startswith("rc=")]
    assert lines == [f"error: {mnt}/run2: cannot use it as a run directory (Read-only file system)"], read_only
    assert "rc=2" in read_only


class SafetensorError(Exception):  # what safetensors raises: an Exception subclass with the OS text in it
    pass


def test_writers_errors_are_classified_as_storage_problems(tmp_path: Path) -> None:
    enospc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    assert storage_problem(enospc, tmp_path) == f"No space left on device: {tmp_path / 'x'}"
    assert storage_problem(OSError(errno.EROFS, "Read-only file system"), tmp_path) == "Read-only file system"
    st = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert storage_problem(st, tmp_path) == "No space left on device"
    try:  # torch.save's message says nothing; the OS error it was handling does
        try:
            raise enospc
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from None
    except RuntimeError as wrapped:
        wrapped.__context__ = enospc
        assert storage_problem(wrapped, tmp_path).startswith("No space left on device")
    # a bug is not a storage problem (this disk has room)
    assert storage_problem(KeyError("loss"), tmp_path) is None
    assert storage_problem(OSError(errno.ENOENT, "No such file or directory"), tmp_path) is None
