"""Process-wide settings the `mopd` command applies once, before any compute.

Why the allocator: a CPU training step allocates and frees hundreds of activation tensors of 0.1-10 MiB. glibc
serves allocations above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh pages from the kernel
and hands the top of a freed heap back to it, so each step page-faults again for memory the last step just
returned. Keeping freed memory in the process (what PyTorch's CPU tuning guides get by preloading jemalloc or
tcmalloc, here with glibc's own `mallopt`) made the benchmark's MOPD step 1.1-1.3x faster and the whole
demo 1.04x (docs/BENCHMARKS.md). The price is a little peak memory: the demo's peak RSS went from 598 to
615 MiB, as freed blocks are reused rather than returned.

A library user who wants the same calls `keep_freed_memory()` at the start of their program; importing mopd
changes nothing process-wide.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest allowed mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX): larger blocks, such
# as a real model's weights or logits, are still mapped and unmapped individually
_MMAP_THRESHOLD = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks below 32 MiB for reuse instead of returning them to the kernel.

    Returns whether the setting took effect: False off Linux or on a C library without glibc's `mallopt`
    (musl, macOS), where nothing is changed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


# a local Ray instance that mopd starts listens on the loopback address only: its node address, the object store
# and the workers' ports are then unreachable from the network, and every rendezvous built from the node address
# (a data-parallel learner's torch.distributed group) stays on this machine
LOCAL_RAY_NODE_IP = "127.0.0.1"
# On Linux Ray rewrites a loopback `_node_ip_address` to the machine's network address (so that other nodes can
# join) unless "clusters" are switched off, which is what this variable does (Ray's own default on macOS and
# Windows). The processes Ray starts inherit it; the driver's copy of the constant was read when ray was imported.
_RAY_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local_ray(ray: Any, **options: Any) -> None:
    """`ray.init` for a new Ray instance on this machine only (no dashboard), bound to the loopback address.

    `address="local"`: without an address, `ray.init` joins the cluster named by $RAY_ADDRESS or, failing that,
    the last one `ray start` recorded on this machine (/tmp/ray/ray_current_cluster), another user's included,
    without a word; a local instance is mopd's own, as `--address` absent promises."""
    os.environ[_RAY_SINGLE_MACHINE] = "0"
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
        constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", include_dashboard=False, _node_ip_address=LOCAL_RAY_NODE_IP, **options)
