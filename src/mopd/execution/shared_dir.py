"""Before a Ray run computes anything: is the run directory one filesystem that every node of the cluster sees?

Why: the driver writes run.json and holds the run's lock, while each stage's worker writes the stage's directory
on whatever node Ray placed it, and a retried stage resumes from the checkpoints its first attempt wrote,
possibly on another node. A node that sees a local disk at the run directory's path (or cannot write there)
would train into a directory nobody else reads: its stages would finish, and their dependants would not find
them, or a retry would start again from nothing. So every live node writes and reads a probe file, and reads
the driver's; a node that cannot is one line, naming it, before any stage starts.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import StageError
from ..core.run_dir import PROBE_PREFIX

PROBE_TIMEOUT_S = 60.0  # each node's probe must answer within this (a worker's start on a busy node included)

Probe = Callable[[str, str, str], "str | None"]


def probe_node(directory: str, token: str, node: str) -> str | None:
    """On one node: read the driver's probe file, then write this node's and read it back. Returns what went
    wrong (a phrase for the error line), or None."""
    root = Path(directory)
    try:
        seen = (root / f"{PROBE_PREFIX}{token}").read_text()
    except OSError as e:
        return f"cannot read the probe file the driver wrote there ({e.strerror or type(e).__name__})"
    if seen != token:
        return "reads another file than the driver wrote there"
    mine = root / f"{PROBE_PREFIX}{token}.{node}"
    try:
        mine.write_text(node)
        back = mine.read_text()
    except OSError as e:
        return f"cannot write there ({e.strerror or type(e).__name__})"
    return None if back == node else "reads back another file than it wrote there"


def node_label(node: dict[str, Any]) -> str:
    """A node as the error line names it: its address and the start of its Ray node id (nodes of one machine
    share the address)."""
    return f"{node.get('NodeManagerAddress', '?')} (node id {str(node.get('NodeID', '?'))[:12]})"


def check_shared_dir(ray: Any, out: Path, probe: Probe = probe_node) -> int:
    """Probe `out` from every live node of the connected Ray cluster (`probe` runs on each, pinned there, with no
    CPU reserved); returns the number of nodes probed. The first node that cannot see the driver's probe file,
    cannot write its own, or whose file the driver cannot read back is one StageError line naming it. The probe
    files are removed in every case."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    out = Path(out).resolve()
    token = secrets.token_hex(8)
    driver_file = out / f"{PROBE_PREFIX}{token}"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=0, max_retries=0)(probe)
    try:
        driver_file.write_text(token)
        refs = [task.options(name="mopd:probe", scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(out), token, n["NodeID"]) for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        for node, ref in zip(nodes, refs, strict=True):
            if ref not in ready:
                why = f"did not answer the run directory's probe within {PROBE_TIMEOUT_S:.0f}s"
            else:
                try:
                    why = ray.get(ref)
                except Exception as e:  # the probe's worker could not start or died
                    why = f"could not run the probe ({type(e).__name__})"
            if why is None and not (out / f"{PROBE_PREFIX}{token}.{node['NodeID']}").is_file():
                why = "writes where the driver cannot read"
            if why is not None:
                raise StageError(f"run directory {out}: Ray node {node_label(node)} {why}: the run directory must "
                                 "be on a filesystem every node sees, at the same path (a shared mount)")
    finally:
        for path in out.glob(f"{PROBE_PREFIX}{token}*"):
            path.unlink(missing_ok=True)
    return len(nodes)
