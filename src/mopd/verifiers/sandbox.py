"""Run an untrusted Python program and its tests in a sandboxed subprocess, and collect the outcomes.

Kept apart from the verifier (:mod:`mopd.verifiers.code`) so that what is isolated, and how, can be read and
audited in one place, independent of how a completion is turned into code and scored.

Processes
---------
``run_code_tests`` starts ``sandbox_harness.py`` (:mod:`mopd.verifiers.sandbox_harness`, the trusted
harness), which first forks the worker (:mod:`mopd.verifiers.sandbox_worker`, untrusted) and only then reads
the nonce and the tests. The worker runs the solution and evaluates the solution-dependent parts of each
test; the harness compares the returned *values* with the expected ones in its own process, so reaching the
harness through ``sys._getframe``/``gc`` (to replace the tests or read the answers) finds nothing: the
tests were never in the worker's memory. Statements that are not ``assert`` (loops, ``check(f)``) still run
in the worker, which only says whether they raised: such tests remain forgeable by a worker take-over.

Result protocol
---------------
The harness reports each outcome as a line ``<nonce> <index> PASS|FAIL`` on a pipe, where the nonce is 128
random bits sent over stdin only (never on disk, in argv or in the environment), read after the worker was
forked. Exiting early, printing fake "PASS" lines, or writing to any file descriptor earns nothing. The
process's exit status is not used at all.

Sandbox (layers; each one is used when the host supports it, see :func:`sandbox_info`)
----------------------------------------------------------------------------------------
* fresh ``tempfile`` directory as cwd, HOME and TMPDIR, owned by the worker's uid, deleted afterwards (also
  on timeout, and also if something in it was made immutable/append-only);
* ``python -I -S -B``: isolated mode, no site-packages (stdlib only), no .pyc writes; an environment of only
  PATH, LANG, HOME and TMPDIR (nothing inherited);
* unprivileged worker: started as root, the worker drops every capability (bounding set, ambient, then
  ``setresuid``) and becomes ``nobody`` (65534) with no groups, so chmod/chown/utime/xattrs/``chattr`` on
  files it does not own fail, as does reading another uid's ``/proc/PID/environ`` or memory; the harness
  is also made non-dumpable. As a normal user nothing can be dropped: the worker keeps the caller's uid;
* fresh network, PID and mount namespaces (``unshare --net --pid --fork --mount-proc``, inside a new user
  namespace when not root), so ``/proc`` shows only the sandbox's own processes; falling back to a network
  namespace only, then to none;
* new session / process group (``start_new_session``), the whole group SIGKILLed at the end and on the
  wall-clock timeout (``timeout_s``, counted from spawn);
* resource limits on the worker: RLIMIT_AS (``memory_mb``), RLIMIT_CPU, RLIMIT_FSIZE (16 MiB),
  RLIMIT_NOFILE, RLIMIT_CORE=0; RLIMIT_NPROC=0 only as a fallback when seccomp is unavailable;
* seccomp-BPF filter on the worker (x86_64 and aarch64): fork/vfork/non-thread clone -> EPERM, clone3 ->
  ENOSYS, ``socket()`` -> EPERM, signals only to itself, EPERM for setrlimit/prlimit64, ptrace,
  process_vm_*, pidfd_*, io_uring, bpf, perf_event_open, mount/namespace/module/keyring/reboot and clock
  calls; other ABIs (i386, x32) are refused;
* Landlock on the worker (Linux >= 5.13): writes, creations, deletions, renames and truncation are refused
  everywhere except the temp dir (and /dev/null); with ABI >= 4 TCP bind/connect, with ABI >= 6 signals and
  abstract unix sockets are scoped. Reading files is *not* restricted (world-readable files stay readable);
* Python-level socket blocking as a last, friendlier layer.

Not guaranteed: this is hardening for model-generated code, not a security boundary against a determined
attacker. Tests written as plain statements rather than ``assert`` are judged by the worker; files readable
by ``nobody`` (or, as a normal user, by the caller) can be read; as a normal user without user namespaces,
metadata of the caller's own files and ``/proc/<parent>/environ`` stay reachable. For hostile code use a
container or VM.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

__all__ = ["CodeRunResult", "run_code_tests", "sandbox_info"]

_RESULT_CAP_BYTES = 1 << 20
_STDERR_TAIL_CHARS = 4000
_NOBODY = 65534
_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_harness.py")
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS = 0x80086601, 0x40086602
_FS_IMMUTABLE_FL, _FS_APPEND_FL = 0x10, 0x20


@dataclass
class CodeRunResult:
    """Outcome of one sandboxed run."""

    passed: int
    total: int
    per_test: list[bool]
    timed_out: bool
    returncode: int | None
    duration_s: float
    stderr_tail: str = ""
    protections: dict = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def run_code_tests(
    code: str, tests: str | list[str], *, timeout_s: float = 5.0, memory_mb: int = 512
) -> CodeRunResult:
    """Run ``code`` then each test in the sandbox; see the module docstring for what is isolated."""
    test_list = _normalize_tests(tests)
    if not isinstance(code, str):
        code = ""
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError("timeout_s and memory_mb must be positive")
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    deadline = start + timeout_s
    workdir = tempfile.mkdtemp(prefix="mopd_sandbox_")
    proc: subprocess.Popen | None = None
    buf = b""
    timed_out = False
    stderr_tail = ""
    try:
        os.chmod(workdir, 0o700)
        # Readable only by us: the worker (nobody, when we are root) may own the directory but not this.
        fd = os.open(os.path.join(workdir, "payload.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump({"code": code, "tests": test_list}, f)
        if os.geteuid() == 0:
            os.chown(workdir, _NOBODY, _NOBODY)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        cmd = [
            *_namespace_prefix(),
            sys.executable,
            "-I",
            "-S",
            "-B",
            _HARNESS,
            str(int(memory_mb) << 20),
            str(int(timeout_s) + 1),
        ]
        # stderr goes to an unnamed file: the directory belongs to the sandbox, a path there could be
        # swapped for a symlink to a file only we may read.
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=workdir,
                env=env,
                close_fds=True,
                start_new_session=True,
            )
            try:
                assert proc.stdin is not None
                proc.stdin.write(nonce.encode() + b"\n")
                proc.stdin.close()
            except OSError:
                pass
            buf, timed_out = _read_until(proc, deadline)
            _kill_group(proc)
            stderr_tail = _tail(err)
    finally:
        if proc is not None:
            _kill_group(proc)
        _remove_tree(workdir)

    per_test, protections = _parse_results(buf, nonce, len(test_list))
    return CodeRunResult(
        passed=sum(per_test),
        total=len(test_list),
        per_test=per_test,
        timed_out=timed_out,
        returncode=proc.returncode if proc is not None else None,
        duration_s=time.monotonic() - start,
        stderr_tail=stderr_tail,
        protections=protections,
    )


@functools.lru_cache(maxsize=1)
def sandbox_info() -> dict:
    """Which protection layers work on this host (runs one trivial sandboxed program, cached)."""
    res = run_code_tests("x = 1", ["assert x == 1"], timeout_s=10.0)
    info = dict(res.protections)
    info["works"] = res.passed == 1
    info["netns"] = "--net" in _namespace_prefix()
    return info


# ----------------------------------------------------------------------------------------- parent side


def _normalize_tests(tests: str | list[str]) -> list[str]:
    if isinstance(tests, str):
        if not tests.strip():
            raise ValueError("code tests are empty")
        return [tests]
    if isinstance(tests, (list, tuple)) and tests and all(isinstance(t, str) and t.strip() for t in tests):
        return list(tests)
    raise ValueError("code tests must be a non-empty string or a non-empty list of non-empty strings")


def _read_until(proc: subprocess.Popen, deadline: float) -> tuple[bytes, bool]:
    """Read the result pipe until EOF and process exit, or until the deadline. Returns (bytes, timed_out)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    chunks: list[bytes] = []
    size = 0
    eof = False
    while not eof:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), True
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        data = os.read(fd, 65536)
        if not data:
            eof = True
        elif size < _RESULT_CAP_BYTES:
            chunks.append(data)
            size += len(data)
    # EOF: wait (without reaping, so the process group id stays ours) for the leader to exit.
    while True:
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            break
        if info is not None:
            break
        if time.monotonic() >= deadline:
            return b"".join(chunks), True
        time.sleep(0.002)
    return b"".join(chunks), False


def _kill_group(proc: subprocess.Popen) -> None:
    # The leader is not reaped yet, so its pid (== the process group id) cannot have been reused.
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)
    with contextlib.suppress(Exception):
        if proc.stdout is not None:
            proc.stdout.close()


def _tail(f) -> str:
    try:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - _STDERR_TAIL_CHARS))
        return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _remove_tree(path: str) -> None:
    """Delete the temp dir; if something in it was made immutable/append-only, clear that and retry."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            _clear_inode_flags(name)
    shutil.rmtree(path, ignore_errors=True)


def _clear_inode_flags(path: str) -> None:
    import array
    import fcntl

    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            flags = array.array("l", [0])
            fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
            flags[0] &= ~(_FS_IMMUTABLE_FL | _FS_APPEND_FL)
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
        finally:
            os.close(fd)


def _parse_results(buf: bytes, nonce: str, n: int) -> tuple[list[bool], dict]:
    text = buf.decode("utf-8", "replace")
    protections: dict = {}
    m = re.search(re.escape(nonce) + r" ready (\{[^\n]*\})\n", text)
    if m:
        with contextlib.suppress(ValueError):
            protections = json.loads(m.group(1))
    outcome: dict[int, set[str]] = {}
    for m in re.finditer(re.escape(nonce) + r" (\d+) (PASS|FAIL)\n", text):
        outcome.setdefault(int(m.group(1)), set()).add(m.group(2))
    # A test passes only if it was reported PASS, never FAIL (duplicates would mean tampering).
    return [outcome.get(i) == {"PASS"} for i in range(n)], protections


@functools.lru_cache(maxsize=1)
def _namespace_prefix() -> tuple[str, ...]:
    """A command prefix for fresh network + PID + mount namespaces (a private /proc), the best that works.

    As root: ``unshare --net --pid --fork --mount-proc``; as a normal user the same inside a new user
    namespace (without a uid mapping, so the sandbox has no capabilities and appears as ``nobody``).
    Falls back to a network namespace only, then to nothing.
    """
    exe = shutil.which("unshare")
    if not exe or not sys.platform.startswith("linux"):
        return ()
    full = ("--net", "--pid", "--fork", "--mount-proc")
    candidates = [
        (exe, *full, "--"),
        (exe, "--user", *full, "--"),
        (exe, "--net", "--"),
        (exe, "--user", "--net", "--"),
    ]
    if os.geteuid() != 0:
        candidates = [candidates[1], candidates[3], candidates[0], candidates[2]]
    for prefix in candidates:
        try:
            r = subprocess.run(
                [*prefix, sys.executable, "-I", "-S", "-c", "pass"], capture_output=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return prefix
    return ()
