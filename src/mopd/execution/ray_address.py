"""`--address HOST:PORT`: is a Ray head there? Asked before `ray.init`, and answered within a bounded time.

Why ask first: `ray.init(address=...)` to a port where something listens that is not a Ray head (a web server, a
stale port, a typo of the head's port) does not fail, it retries. With Ray 2.60 each try waits 5 s to connect, 5 s
for the pubsub channel and 30 s for the cluster id, and it makes 20 tries, so the run hung for more than 5
minutes before the first line of output. The first thing Ray's own client asks a head is its cluster id
(`NodeInfoGcsService.GetClusterId`); asking that once, with a deadline, tells a Ray head from anything else in
milliseconds, and a silent port in `connect_timeout()` seconds.

Only HOST:PORT (the GCS address) is asked: `ray://HOST:PORT` goes through Ray Client, which gives up on its own
after 30 s, and `auto` reads the address of the cluster this machine belongs to from a local file.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from ..core.errors import StageError

CONNECT_TIMEOUT_ENV = "MOPD_RAY_CONNECT_TIMEOUT"  # seconds; a slow link to a remote head may need more
DEFAULT_CONNECT_TIMEOUT_S = 30.0


def connect_timeout() -> float:
    """The bound on asking a head, from $MOPD_RAY_CONNECT_TIMEOUT (default 30 s); a bad value is one line."""
    raw = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_CONNECT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise StageError(f"${CONNECT_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def check_address(ray: Any, address: str) -> None:
    """One StageError line, within `connect_timeout()` seconds, unless a Ray head answers at `address` (for
    `ray://` and `auto`, only the form is checked: see the module's docstring)."""
    if address == "auto":
        return
    client = address.startswith("ray://")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StageError(f"--address {address}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    timeout = connect_timeout()
    deadline = time.monotonic() + timeout
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise StageError(f"--address {address}: no Ray head answers there within {timeout:g}s "
                         f"({e.strerror or e}); start one with `ray start --head`") from None
    if not client:
        _ask_cluster_id(ray, address, max(deadline - time.monotonic(), 0.1), timeout)


def _ask_cluster_id(ray: Any, address: str, left_s: float, timeout: float) -> None:
    """Ask the GCS at `address` for its cluster id, through the channel Ray itself would open (its TLS and token
    settings); a head that refuses the question (its authentication) is still a head: ray.init says the rest."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    try:
        from ray._private.grpc_utils import init_grpc_channel
        channel = init_grpc_channel(address)
    except ImportError:  # a Ray without it: the plain channel of a head without TLS
        channel = grpc.insecure_channel(address)
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(gcs_service_pb2.GetClusterIdRequest(),
                                                                          timeout=left_s)
    except grpc.RpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return
        # gRPC's detail ends with the transport's own words: "connection attempt timed out before receiving
        # SETTINGS frame" (a silent port), "Failed parsing HTTP/2 (...)" (a web server)
        detail = (e.details() or "").rsplit(": ", 1)[-1].strip()[:160]
        why = "no answer" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name.lower() + (
            f": {detail}" if detail else "")
        raise StageError(f"--address {address}: something listens there, but no Ray head answered within "
                         f"{timeout:g}s ({why}); give the head's GCS address (`ray start --head` prints it, port "
                         f"6379 by default), or set ${CONNECT_TIMEOUT_ENV} for a slow link") from None
    finally:
        channel.close()
