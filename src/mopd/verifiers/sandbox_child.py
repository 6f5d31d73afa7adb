"""The worker's lock-down layers: rlimits, the uid/capability drop, Landlock, seccomp, socket blocking.

Loaded by :mod:`mopd.verifiers.sandbox_harness` inside the sandboxed interpreter, so it imports nothing
outside the standard library; :func:`lock_down` is called by the worker before the solution's first line
runs. Kept apart so that what is locked down, and in which order, can be audited in one place. See
:mod:`mopd.verifiers.sandbox` for the layers and what they do not guarantee.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

_FSIZE_BYTES = 16 << 20
_NOFILE = 64

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


_NOBODY = 65534
_CAP_LAST_FALLBACK = 40


def drop_privileges() -> dict:
    """Become an unprivileged user with no capabilities, when started as root.

    Root ignores file permissions and may change metadata (chmod, chown, utimes, xattrs, ``chattr +i``)
    anywhere, which Landlock does not cover, and may read every process's ``/proc/PID/environ``. As
    ``nobody`` with an empty capability set those all fail with EPERM/EACCES. Not root (a normal user):
    nothing to drop; the other layers and the namespaces chosen by the parent still apply.
    """
    import ctypes

    out: dict = {"uid": os.geteuid()}
    if os.geteuid() != 0:
        out["caps_dropped"] = _cap_eff() == 0
        return out
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    last = _CAP_LAST_FALLBACK
    with contextlib.suppress(OSError, ValueError), open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: no way back to any capability, even via exec
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    _keep_stdlib_reachable()
    try:
        os.setgroups([])
        os.setresgid(_NOBODY, _NOBODY, _NOBODY)
        os.setresuid(_NOBODY, _NOBODY, _NOBODY)  # clears the permitted and effective capability sets
    except OSError:  # e.g. a user namespace without 65534 mapped: stay uid 0, but without capabilities
        out["caps_dropped"] = _clear_capabilities(libc) and _cap_eff() == 0
        return out
    out["uid"] = os.geteuid()
    out["caps_dropped"] = _cap_eff() == 0 and os.getuid() == _NOBODY
    return out


def _keep_stdlib_reachable() -> None:
    """Point ``sys.path`` at directory fds opened while still root.

    The interpreter may live where ``nobody`` cannot search (pyenv under a 0700 ``/root``); the magic
    link ``/proc/self/fd/N`` reaches the directory without walking its ancestors, so ``import`` keeps
    working after the drop without granting read access to anything else.
    """
    for i, entry in enumerate(list(sys.path)):
        if not entry or entry.startswith("/proc/self/fd/") or not os.path.isdir(entry):
            continue
        with contextlib.suppress(OSError):
            via_fd = f"/proc/self/fd/{os.open(entry, os.O_PATH | os.O_DIRECTORY)}"
            if os.path.isdir(via_fd):  # /proc is mounted
                sys.path[i] = via_fd


def _clear_capabilities(libc) -> bool:
    """capset(2) with empty effective, permitted and inheritable sets (version 3 header)."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    return libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) == 0


def _cap_eff() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return -1


def lock_down(workdir: str, memory_bytes: int, cpu_s: int) -> dict:
    """Apply every layer to the calling process (the worker), in order; returns what took effect.

    Limits first (a non-root user may still lower them), then the uid/capability drop, then Landlock and
    seccomp (which also forbids raising the limits again), then the Python-level socket block.
    """
    import resource

    protections: dict = {}
    limits = [
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_FSIZE, _FSIZE_BYTES),
        (resource.RLIMIT_NOFILE, _NOFILE),
        (resource.RLIMIT_CORE, 0),
    ]
    for res, value in limits:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(res, (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes fail with EFBIG instead of killing
    try:
        protections.update(drop_privileges())
    except Exception:
        protections["caps_dropped"] = False
    try:
        protections["landlock_abi"] = _install_landlock(workdir)
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
    return protections
