"""The untrusted side of the sandbox: the worker process that runs the solution and evaluates expressions.

The harness (:mod:`mopd.verifiers.sandbox_harness`) forks the worker *before* it has read the tests or the
nonce, so nothing secret is in the worker's memory: introspection (``sys._getframe``, ``gc``) from the
solution finds only the one expression being evaluated right now. The worker never decides whether a test
passed; it returns *values* (encoded as plain data, see :func:`encode`) that the harness compares with
the expected ones in its own process. A tampered worker can therefore lie about values, but it cannot know
which value would pass.

Also home of the wire format both sides use: frames of an 8-byte length and a JSON body.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from collections.abc import KeysView

__all__ = ["Opaque", "decode", "encode", "recv", "send", "worker_main"]

MAX_FRAME = 32 << 20
_MAX_NODES = 1_000_000
_MAX_DEPTH = 200


class _TooBig(Exception):
    pass


def send(fd: int, obj: object) -> None:
    """Write one frame (raises OSError if the other side is gone)."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    data = struct.pack(">Q", len(body)) + body
    while data:
        n = os.write(fd, data)
        data = data[n:]


def recv(fd: int, limit: int = MAX_FRAME) -> object:
    """Read one frame; EOFError when the other side closed, ValueError for an oversized or bad frame."""
    header = _read_exact(fd, 8)
    (size,) = struct.unpack(">Q", header)
    if size > limit:
        raise ValueError("frame too large")
    return json.loads(_read_exact(fd, size))


def _read_exact(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        data = os.read(fd, min(n - got, 1 << 20))
        if not data:
            raise EOFError
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------- values


def encode(value: object) -> object:
    """Plain-data form of a value: tagged JSON lists; anything else becomes an opaque marker.

    Only builtin value types cross over (and their subclasses, as the base type), so an object whose
    ``__eq__`` always answers True becomes opaque, and opaque values fail every comparison in the harness.
    """
    budget = [_MAX_NODES]
    try:
        return _enc(value, 0, budget)
    except (_TooBig, RecursionError):
        return ["o", "too large"]


def _enc(v: object, depth: int, budget: list[int]) -> object:
    budget[0] -= 1
    if budget[0] < 0 or depth > _MAX_DEPTH:
        raise _TooBig
    if v is None or v is True or v is False:
        return v
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):
        return ["i", format(int(v), "x")]
    if isinstance(v, float):
        return ["f", float.hex(float(v))]
    if isinstance(v, complex):
        return ["c", float.hex(v.real), float.hex(v.imag)]
    if isinstance(v, str):
        budget[0] -= len(v) // 64
        return ["s", str.__str__(v)]
    if isinstance(v, (bytes, bytearray)):
        budget[0] -= len(v) // 32
        return ["b" if isinstance(v, bytes) else "B", bytes(v).hex()]
    if isinstance(v, dict):
        return ["d", [[_enc(k, depth + 1, budget), _enc(x, depth + 1, budget)] for k, x in dict.items(v)]]
    for typ, tag in ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F")):
        if isinstance(v, typ):
            return [tag, [_enc(x, depth + 1, budget) for x in typ.__iter__(v)]]
    fractions, decimal = sys.modules.get("fractions"), sys.modules.get("decimal")
    if fractions is not None and isinstance(v, fractions.Fraction):
        return ["Q", format(int(v.numerator), "x"), format(int(v.denominator), "x")]
    if decimal is not None and isinstance(v, decimal.Decimal):
        return ["D", str(decimal.Decimal.__str__(v))]
    if isinstance(v, KeysView):  # compares like a set
        return ["S", [_enc(x, depth + 1, budget) for x in iter(v)]]
    return ["o", type(v).__name__[:100]]


class Opaque:
    """A value the harness cannot see: every comparison, truth test or use raises, so the check fails."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def _refuse(self, *args: object) -> bool:
        raise TypeError(f"a value of type {self.type_name!r} cannot be checked by the harness")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __contains__ = __iter__ = _refuse
    __len__ = __hash__ = __add__ = __sub__ = __mul__ = __neg__ = _refuse


def decode(obj: object, depth: int = 0) -> object:
    """Inverse of :func:`encode`, run by the harness on untrusted input (bounded depth; raises on junk)."""
    if depth > _MAX_DEPTH + 1:
        raise ValueError("too deep")
    if obj is None or isinstance(obj, bool):
        return obj
    if not isinstance(obj, list) or not obj or not isinstance(obj[0], str):
        raise ValueError("bad value")
    tag, rest = obj[0], obj[1:]
    if tag == "i":
        return int(str(rest[0]), 16)
    if tag == "f":
        return float.fromhex(str(rest[0]))
    if tag == "c":
        return complex(float.fromhex(str(rest[0])), float.fromhex(str(rest[1])))
    if tag == "s":
        return str(rest[0])
    if tag in ("b", "B"):
        raw = bytes.fromhex(str(rest[0]))
        return raw if tag == "b" else bytearray(raw)
    if tag == "d":
        return {decode(k, depth + 1): decode(x, depth + 1) for k, x in rest[0]}
    build = {"l": list, "t": tuple, "S": set, "F": frozenset}.get(tag)
    if build is not None:
        return build(decode(x, depth + 1) for x in rest[0])
    if tag == "Q":
        from fractions import Fraction

        return Fraction(int(str(rest[0]), 16), int(str(rest[1]), 16))
    if tag == "D":
        from decimal import Decimal

        return Decimal(str(rest[0])[:10000])
    if tag == "o":
        return Opaque(str(rest[0])[:100])
    raise ValueError("bad tag")


# --------------------------------------------------------------------------------------------- worker


def worker_main(
    cmd_fd: int, reply_fd: int, workdir: str, memory_bytes: int, cpu_s: int
) -> None:  # pragma: no cover
    """Lock this (forked) process down, then serve ``solution``/``exec``/``eval`` requests until EOF.

    Runs in the sandboxed worker: tracebacks go to stderr (the parent shows their tail), stdout goes to
    /dev/null. Always ends with ``os._exit``.
    """
    import builtins
    import traceback

    from_harness = sys.modules["mopd_sandbox_child"]
    _exit, _compile, _exec, _eval, _base_exc = os._exit, compile, exec, eval, BaseException
    _send, _recv, _encode, print_exc = send, recv, encode, traceback.print_exc
    try:
        protections = from_harness.lock_down(workdir, memory_bytes, cpu_s)
        _send(reply_fd, {"ready": protections})
    except _base_exc:
        with contextlib.suppress(_base_exc):
            print_exc()
        _exit(4)
    namespace: dict = {"__name__": "__solution__", "__builtins__": builtins}
    del from_harness
    while True:
        try:
            msg = _recv(cmd_fd)
        except _base_exc:
            _exit(0)
        reply: dict = {"ok": False}
        try:
            op, src = msg["op"], msg["src"]
            if op == "eval":
                reply = {"ok": True, "value": _encode(_eval(_compile(src, "<test>", "eval"), namespace))}
            else:
                _exec(_compile(src, "<solution>" if op == "solution" else "<test>", "exec"), namespace)
                reply = {"ok": True}
        except _base_exc:
            with contextlib.suppress(_base_exc):
                print_exc()
        try:
            _send(reply_fd, reply)
        except _base_exc:
            _exit(3)
