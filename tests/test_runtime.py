"""`mopd.runtime.keep_freed_memory`: after it, a mid-sized allocation comes from the heap instead of its own
mmap, and the `mopd` commands apply it before any work. Checked in a fresh interpreter, where glibc still has
its default thresholds, through glibc's own accounting (`mallinfo2`: blocks served by mmap)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")

PROBE = """
import ctypes
from mopd.runtime import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped_blocks_and_kept_bytes(size):
    before = libc.mallinfo2().hblks
    p = libc.malloc(size)
    during = libc.mallinfo2().hblks
    libc.free(p)
    return during - before, libc.mallinfo2().fordblks >= size

# freeing a mapped block raises glibc's own threshold to that block's size, so the block probed after the setting
# (16 MiB) is larger than the one probed before it (1 MiB): without the setting it would be mapped again
print(*mapped_blocks_and_kept_bytes(1 << 20), keep_freed_memory(), *mapped_blocks_and_kept_bytes(16 << 20),
      mapped_blocks_and_kept_bytes(64 << 20)[0])
"""


def test_mid_sized_blocks_come_from_the_heap_after_the_setting() -> None:
    try:
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    except subprocess.CalledProcessError as e:
        if "mallinfo2" in e.stderr:
            pytest.skip("not glibc >= 2.33")
        raise
    default, kept_by_default, applied, after, kept_after, huge = out.split()
    assert (default, kept_by_default) == ("1", "False")  # glibc's default: a 1 MiB block is mapped, then unmapped
    assert applied == "True"
    assert (after, kept_after) == ("0", "True")  # now served from the heap, and kept there when freed
    assert huge == "1"  # above the 32 MiB threshold (real weights, logits) blocks are still mapped


def test_the_commands_apply_it_before_running(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    import mopd.cli as cli
    import mopd.runtime as runtime
    from mopd.cli import app

    order: list[str] = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: order.append("allocator") or True)
    monkeypatch.setattr(cli, "_run", lambda recipe, out, log=(): order.append("run"))
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert order == ["allocator", "run"]
