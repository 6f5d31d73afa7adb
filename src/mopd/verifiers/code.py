"""Python code verifier: run a completion's code against assert-style tests in a sandboxed subprocess.

Reward
------
``code_reward(completion, tests)`` extracts the code (see :func:`extract_code`) and runs it, then the
tests, in a fresh interpreter. ``tests`` is either one string of Python statements (reward 1.0 if all of
them run without raising, else 0.0) or a list of separate test snippets (reward = fraction that pass;
they share the namespace of the solution and run in order, each one on its own, so a failing or raising
test does not stop the next one; a test that hangs ends the run, and the tests after it count as failed).

The child reports each outcome as a line ``<nonce> <index> PASS|FAIL`` on a pipe, where the nonce is 128
random bits sent over stdin only (never on disk, in argv or in the environment). Exiting early
(``os._exit(0)``), printing fake "PASS" lines, or writing to any file descriptor therefore earns nothing.
The process's exit status is not used at all.

Sandbox (layers; each one is used when the host supports it, see :func:`sandbox_info`)
----------------------------------------------------------------------------------------
* fresh ``tempfile`` directory as cwd, HOME and TMPDIR, deleted afterwards (also on timeout);
* ``python -I -S -B``: isolated mode (no PYTHON* env vars, no user site, script dir not on sys.path),
  no site-packages (stdlib only), no .pyc writes; minimal environment (PATH, LANG, HOME, TMPDIR);
* new session / process group (``start_new_session``), the whole group SIGKILLed at the end and on the
  wall-clock timeout (``timeout_s``, counted from spawn);
* resource limits, set by the child on itself before any untrusted code runs: RLIMIT_AS (``memory_mb``),
  RLIMIT_CPU, RLIMIT_FSIZE (16 MiB), RLIMIT_NOFILE, RLIMIT_CORE=0; RLIMIT_NPROC=0 only as a fallback when
  seccomp is unavailable (it does not apply to root, and it would otherwise also forbid threads);
* seccomp-BPF filter (x86_64 and aarch64): fork/vfork/non-thread clone -> EPERM (fork bombs die at the
  first fork; threads still work), clone3 -> ENOSYS (glibc falls back to clone), ``socket()`` -> EPERM,
  signals only to itself, and EPERM for setrlimit/prlimit64 (limits cannot be raised even by root),
  ptrace, process_vm_*, pidfd_*, io_uring, bpf, perf_event_open, mount/namespace/module/keyring/reboot
  and clock calls; other ABIs (i386, x32) are refused;
* Landlock (Linux >= 5.13): writes, creations, deletions, renames and truncation are refused everywhere
  except the temp dir (and /dev/null); with Landlock ABI >= 4 TCP bind/connect are refused, with ABI >= 6
  signals and abstract unix sockets are scoped to the sandbox. Reading files is *not* restricted;
* a new network namespace via ``unshare --net`` (or ``unshare --user --net``) when that works here;
* Python-level socket blocking (``socket.socket`` & co. raise) as a last, friendlier layer.

Not guaranteed: this is hardening for model-generated code, not a security boundary against a determined
attacker, especially when running as root: read access to the file system is open, code running in the
same interpreter as the driver can in principle find the nonce by introspection (``sys._getframe``), and
solutions can still "win" assert-based tests by returning objects whose ``__eq__`` always answers True or
by monkeypatching builtins the tests use. Without seccomp and Landlock (non-Linux, old kernels, unknown
architectures) only the temp dir, rlimits, process-group kill and the Python-level socket block remain,
and a fork bomb run as root is only stopped by the timeout. For hostile code use a container or VM.

This file is also the child's driver: it is executed as ``python -I -S -B .../code.py`` and therefore
imports nothing outside the standard library.
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

__all__ = ["CodeRunResult", "code_reward", "extract_code", "run_code_tests", "sandbox_info"]

_RESULT_CAP_BYTES = 1 << 20
_STDERR_TAIL_CHARS = 4000
_FSIZE_BYTES = 16 << 20
_NOFILE = 64

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PY_TAGS = {"python", "py", "python3", "py3"}


def extract_code(completion: str) -> str:
    """The Python code in a completion.

    Fenced blocks tagged ``python``/``py`` are preferred, then untagged fenced blocks; among those, the
    last block that defines something (``def``/``class``) wins, else the last block. A trailing fence that
    was never closed (a truncated generation) runs to the end of the text. Without any fence the whole
    text is taken as code.
    """
    if not isinstance(completion, str):
        return ""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE_RE.finditer(completion)]
    for wanted in (lambda tag: tag in _PY_TAGS, lambda tag: tag == ""):
        chosen = [body for tag, body in blocks if wanted(tag)]
        if chosen:
            defining = [b for b in chosen if re.search(r"^\s*(?:async\s+def|def|class)\s", b, re.MULTILINE)]
            return (defining or chosen)[-1].strip("\n")
    if blocks:  # only blocks tagged with another language: no Python here
        return ""
    return completion.strip("\n")


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


def code_reward(
    completion: str, tests: str | list[str], *, timeout_s: float = 5.0, memory_mb: int = 512
) -> float:
    """1.0/0.0 for a string of test statements, the fraction of passing tests for a list of them.

    Never raises on a bad completion; raises ``ValueError`` for empty or malformed ``tests``.
    """
    code = extract_code(completion)
    result = run_code_tests(code, tests, timeout_s=timeout_s, memory_mb=memory_mb)
    return result.fraction


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
        payload = {
            "code": code,
            "tests": test_list,
            "workdir": workdir,
            "memory_bytes": int(memory_mb) << 20,
            "cpu_s": int(timeout_s) + 1,
        }
        with open(os.path.join(workdir, "payload.json"), "w", encoding="utf-8") as f:
            json.dump(payload, f)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        cmd = [*_netns_prefix(), sys.executable, "-I", "-S", "-B", os.path.abspath(__file__)]
        with open(os.path.join(workdir, "stderr.txt"), "wb") as err:
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
        stderr_tail = _tail(os.path.join(workdir, "stderr.txt"))
    finally:
        if proc is not None:
            _kill_group(proc)
        shutil.rmtree(workdir, ignore_errors=True)

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
    info["netns"] = bool(_netns_prefix())
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


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _STDERR_TAIL_CHARS))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


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
def _netns_prefix() -> tuple[str, ...]:
    """A command prefix that runs the child in a fresh network namespace, or () when none works here."""
    exe = shutil.which("unshare")
    if not exe or not sys.platform.startswith("linux"):
        return ()
    for prefix in ((exe, "--net", "--"), (exe, "--user", "--net", "--")):
        try:
            r = subprocess.run(
                [*prefix, sys.executable, "-I", "-S", "-c", "pass"], capture_output=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return prefix
    return ()


# ------------------------------------------------------------------------------------------ child side
# Everything below runs inside the sandboxed interpreter, before and around the untrusted code.

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_SYSCALL_BIT = 0x40000000
# syscall numbers: (x86_64, aarch64 / asm-generic)
_SYS = {
    "fork": (57, None),
    "vfork": (58, None),
    "clone": (56, 220),
    "clone3": (435, 435),
    "socket": (41, 198),
    "setrlimit": (160, 164),
    "prlimit64": (302, 261),
    "kill": (62, 129),
    "tgkill": (234, 131),
    "tkill": (200, 130),
    "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240),
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "pidfd_open": (434, 434),
    "pidfd_send_signal": (424, 424),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "unshare": (272, 97),
    "setns": (308, 268),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsmount": (432, 432),
    "mount_setattr": (442, 442),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "reboot": (169, 142),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "acct": (163, 89),
    "quotactl": (179, 60),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "keyctl": (250, 219),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "sethostname": (170, 161),
    "setdomainname": (171, 162),
    "syslog": (103, 116),
    "vhangup": (153, 58),
    "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265),
    "personality": (135, 92),
    "iopl": (172, None),
    "ioperm": (173, None),
}
_DENY = [
    n for n in _SYS if n not in {"clone", "clone3", "kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"}
]
_SELF_SIGNAL_ONLY = ["kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"]
_CLONE_THREAD = 0x00010000
_EPERM, _ENOSYS = 1, 38


def _seccomp_program(arch: str, own_pid: int) -> list[tuple[int, int, int, int]]:
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, errno_base = 0x7FFF0000, 0x00050000
    col = 0 if arch == "x86_64" else 1
    prog = [
        (ld_abs, 0, 0, 4),  # seccomp_data.arch
        (jeq, 1, 0, _AUDIT_ARCH[arch]),
        (ret, 0, 0, errno_base | _EPERM),
        (ld_abs, 0, 0, 0),  # seccomp_data.nr
    ]
    if arch == "x86_64":
        prog += [(jge, 0, 1, _X32_SYSCALL_BIT), (ret, 0, 0, errno_base | _EPERM)]
    for name in _DENY:
        nr = _SYS[name][col]
        if nr is not None:
            prog += [(jeq, 0, 1, nr), (ret, 0, 0, errno_base | _EPERM)]
    prog += [(jeq, 0, 1, _SYS["clone3"][col]), (ret, 0, 0, errno_base | _ENOSYS)]
    # clone: allowed only for threads (flags is argument 0 on both architectures; low 32 bits at 16)
    prog += [
        (jeq, 0, 4, _SYS["clone"][col]),
        (ld_abs, 0, 0, 16),
        (jset, 0, 1, _CLONE_THREAD),
        (ret, 0, 0, allow),
        (ret, 0, 0, errno_base | _EPERM),
    ]
    for name in _SELF_SIGNAL_ONLY:  # target pid/tgid is argument 0 (a 32-bit pid_t)
        prog += [
            (jeq, 0, 4, _SYS[name][col]),
            (ld_abs, 0, 0, 16),
            (jeq, 0, 1, own_pid & 0xFFFFFFFF),
            (ret, 0, 0, allow),
            (ret, 0, 0, errno_base | _EPERM),
        ]
    prog.append((ret, 0, 0, allow))
    return prog


def _install_seccomp() -> bool:
    import ctypes
    import platform

    arch = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    if not sys.platform.startswith("linux") or arch not in _AUDIT_ARCH:
        return False

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    prog = _seccomp_program(arch, os.getpid())
    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, None, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    return libc.prctl(22, 2, ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p), 0, 0) == 0  # SECCOMP


def _install_landlock(workdir: str) -> int:
    """Restrict writes to ``workdir``; returns the Landlock ABI used, 0 when unavailable."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    write_file, truncate = 1 << 1, 1 << 14
    fs = write_file | sum(1 << b for b in (4, 5, 6, 7, 8, 9, 10, 11, 12))  # remove_*, make_*
    if abi >= 2:
        fs |= 1 << 13  # REFER
    if abi >= 3:
        fs |= truncate
    net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no rule allowing any port
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets | signals
    attr = RulesetAttr(fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(ctypes.c_long(444), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0
    try:
        for path, access in ((workdir, fs), ("/dev/null", fs & (write_file | truncate))):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = PathBeneath(access, fd)
                if (
                    libc.syscall(
                        ctypes.c_long(445),
                        ctypes.c_int(ruleset),
                        ctypes.c_int(1),
                        ctypes.byref(rule),
                        ctypes.c_uint32(0),
                    )
                    != 0
                ):
                    return 0
            finally:
                os.close(fd)
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        if libc.prctl(38, 1, 0, 0, 0) != 0:
            return 0
        if libc.syscall(ctypes.c_long(446), ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            return 0
        return int(abi)
    finally:
        os.close(ruleset)


def _block_python_sockets() -> None:
    import _socket
    import socket

    def blocked(*args, **kwargs):
        raise PermissionError("network access is disabled in the mopd code sandbox")

    class BlockedSocket:
        def __new__(cls, *args, **kwargs):
            blocked()

    for mod in (socket, _socket):
        for name in ("socket", "SocketType"):
            if hasattr(mod, name):
                setattr(mod, name, BlockedSocket)
    for name in (
        "create_connection",
        "create_server",
        "socketpair",
        "fromfd",
        "getaddrinfo",
        "gethostbyname",
        "gethostbyname_ex",
        "gethostbyaddr",
    ):
        if hasattr(socket, name):
            setattr(socket, name, blocked)


def _child_main() -> None:  # pragma: no cover - runs in the sandboxed subprocess
    import builtins
    import resource
    import traceback

    nonce = sys.stdin.readline().strip()
    with open("payload.json", encoding="utf-8") as f:
        payload = json.load(f)
    os.unlink("payload.json")
    out_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)

    # Bind what the reporting path needs now: later the untrusted code may monkeypatch os or builtins.
    _write, _exit, _exec, _compile, _base_exc = os.write, os._exit, exec, compile, BaseException

    def report(line: str) -> None:
        try:
            _write(out_fd, f"{nonce} {line}\n".encode())
        except _base_exc:
            _exit(3)

    protections: dict = {}
    limits = [
        (resource.RLIMIT_AS, payload["memory_bytes"]),
        (resource.RLIMIT_CPU, payload["cpu_s"]),
        (resource.RLIMIT_FSIZE, _FSIZE_BYTES),
        (resource.RLIMIT_NOFILE, _NOFILE),
        (resource.RLIMIT_CORE, 0),
    ]
    for res, value in limits:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(res, (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes fail with EFBIG instead of killing
    try:
        protections["landlock_abi"] = _install_landlock(payload["workdir"])
    except Exception:
        protections["landlock_abi"] = 0
    try:
        protections["seccomp"] = _install_seccomp()
    except Exception:
        protections["seccomp"] = False
    if not protections["seccomp"]:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    _block_python_sockets()
    protections["rlimits"] = True
    report("ready " + json.dumps(protections))

    namespace = {"__name__": "__solution__", "__builtins__": builtins}
    tests = payload["tests"]
    print_exc = traceback.print_exc
    try:
        _exec(_compile(payload["code"], "<solution>", "exec"), namespace)
        solution_ok = True
    except _base_exc:
        print_exc()
        solution_ok = False
    for i in range(len(tests)):
        ok = False
        if solution_ok:
            try:
                _exec(_compile(tests[i], f"<test {i}>", "exec"), namespace)
                ok = True
            except _base_exc:
                print_exc()
        report(f"{i} {'PASS' if ok else 'FAIL'}")
    _exit(0)


if __name__ == "__main__":
    _child_main()
