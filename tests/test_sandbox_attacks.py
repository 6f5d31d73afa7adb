"""Attacks from the security probe of the code sandbox, kept as regression tests.

Each attack is run by a *wrong* (or no) solution and must earn nothing or change nothing, while the correct
solution still scores 1.0. The probe ran as root, where Landlock alone left metadata calls open; the tests
that need root to be meaningful say so.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mopd.verifiers import run_code_tests
from mopd.verifiers.sandbox import _namespace_prefix

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]
GOOD = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
IMMUTABLE, APPEND = 0x10, 0x20
IS_ROOT = os.geteuid() == 0


def _flags(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        buf = array.array("l", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
        return buf[0]
    finally:
        os.close(fd)


def _clear_flags(path: str) -> None:
    """Never leave an immutable/append-only file behind, whatever the attack did."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            buf = array.array("l", [0])
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
            if buf[0] & (IMMUTABLE | APPEND):
                buf[0] &= ~(IMMUTABLE | APPEND)
                fcntl.ioctl(fd, FS_IOC_SETFLAGS, buf, True)
        finally:
            os.close(fd)


SETFLAGS = (
    "import os, fcntl, array\n"
    "def setflags(path, flag):\n"
    "    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)\n"
    "    try:\n"
    "        buf = array.array('l', [0])\n"
    f"        fcntl.ioctl(fd, {FS_IOC_GETFLAGS}, buf, True)\n"
    "        buf[0] |= flag\n"
    f"        fcntl.ioctl(fd, {FS_IOC_SETFLAGS}, buf, True)\n"
    "    finally:\n"
    "        os.close(fd)\n"
    "done = []\n"
    "def attempt(name, fn):\n"
    "    try:\n"
    "        fn()\n"
    "        done.append(name)\n"
    "    except OSError:\n"
    "        pass\n"
)


@pytest.fixture
def victim(tmp_path: Path):
    """A root-owned 0644 file in a 0755 directory: reachable by the sandbox, but not its to change.

    pytest's ``tmp_path`` sits below a 0700 directory that ``nobody`` could not even reach (which would
    make the attack fail for the wrong reason), so the victim directory is made in the system temp dir.
    """
    folder = tempfile.mkdtemp(prefix="mopd_victim_")
    os.chmod(folder, 0o755)
    path = os.path.join(folder, "victim.txt")
    Path(path).write_text("precious\n")
    os.chmod(path, 0o644)
    (tmp_path / "victim_path").write_text(path)
    try:
        yield path
    finally:
        _clear_flags(path)
        _clear_flags(folder)
        shutil.rmtree(folder, ignore_errors=True)


def _snapshot(path: str) -> tuple:
    st = os.stat(path)
    return (
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_mtime_ns,
        st.st_ctime_ns,
        os.listxattr(path),
        _flags(path),
    )


def test_metadata_outside_tempdir_is_unchangeable(victim):
    attack = SETFLAGS + (
        f"V = {victim!r}\n"
        "attempt('chmod', lambda: os.chmod(V, 0o777))\n"
        "attempt('chown', lambda: os.chown(V, 65534, 65534))\n"
        "attempt('utime', lambda: os.utime(V, (0, 0)))\n"
        "attempt('setxattr', lambda: os.setxattr(V, 'user.pwned', b'1'))\n"
        "attempt('trusted_xattr', lambda: os.setxattr(V, 'trusted.pwned', b'1'))\n"
        "attempt('chattr+a', lambda: setflags(V, 0x20))\n"
        "attempt('chattr+i', lambda: setflags(V, 0x10))\n"
        "attempt('chmod_dir', lambda: os.chmod(os.path.dirname(V), 0o777))\n"
        "attempt('chattr+i_dir', lambda: setflags(os.path.dirname(V), 0x10))\n"
        "import sys\nprint('DONE', done, file=sys.stderr)\n"
    )
    folder = os.path.dirname(victim)
    before, before_dir = _snapshot(victim), _snapshot(folder)
    res = run_code_tests(attack + GOOD, [*ADD_TESTS, "assert done == []"])
    after, after_dir = _snapshot(victim), _snapshot(folder)
    assert "DONE []" in res.stderr_tail, res.stderr_tail
    assert after == before and after_dir == before_dir
    assert not _flags(victim) & (IMMUTABLE | APPEND)
    assert res.fraction == 1.0  # the correct solution still scores 1
    if IS_ROOT:
        assert res.protections["uid"] != 0 and res.protections["caps_dropped"]


def test_chattr_inside_tempdir_cannot_block_cleanup():
    attack = SETFLAGS + (
        "import sys\n"
        "print(os.getcwd(), file=sys.stderr)\n"
        "open('f.txt', 'w').write('x')\n"
        "os.mkdir('d')\n"
        "attempt('file+i', lambda: setflags('f.txt', 0x10))\n"
        "attempt('file+a', lambda: setflags('f.txt', 0x20))\n"
        "attempt('dir+i', lambda: setflags('d', 0x10))\n"
        "attempt('cwd+i', lambda: setflags('.', 0x10))\n"
    )
    res = run_code_tests(attack + WRONG, [*ADD_TESTS, "assert done == []"])
    cwd = res.stderr_tail.splitlines()[0].strip()
    assert os.path.basename(cwd).startswith("mopd_sandbox_")
    assert not os.path.exists(cwd)  # removed even if a flag had been set
    assert res.per_test == [False, False, False, True]  # wrong solution; and no flag could be set


ENV_ATTACK = (
    "import os, sys\n"
    "found = []\n"
    "pids = [str(os.getppid()), '1'] + [p for p in os.listdir('/proc') if p.isdigit()]\n"
    "for p in pids:\n"
    "    try:\n"
    "        data = open(f'/proc/{p}/environ', 'rb').read()\n"
    "    except OSError:\n"
    "        continue\n"
    "    if b'MOPD_SECRET' in data:\n"
    "        found.append(data.decode('latin-1'))\n"
    "for d in found:\n"
    "    print(d, file=sys.stderr)\n"
    "leaked = bool(found) or 'MOPD_SECRET' in os.environ\n"
)


def test_parent_environment_is_unreadable(monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("MOPD_SECRET", secret)  # inherited env: must not reach the sandbox
    res = run_code_tests(ENV_ATTACK + GOOD, ["assert leaked", *ADD_TESTS])
    assert res.per_test == [False, True, True, True]
    assert secret not in res.stderr_tail
    # /proc/PID/environ shows the env a process was *started* with: start a real parent holding the secret.
    script = (
        "import json, os, sys\n"
        "from mopd.verifiers import run_code_tests\n"
        "mine = open(f'/proc/{os.getpid()}/environ').read()\n"
        f"res = run_code_tests({ENV_ATTACK + GOOD!r}, ['assert leaked', 'assert add(2, 3) == 5'])\n"
        "print(json.dumps([os.environ['MOPD_SECRET'] in mine, res.per_test, res.stderr_tail]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    really_there, per_test, tail = json.loads(out.stdout)
    assert really_there  # the secret is in the parent's /proc/PID/environ ...
    assert per_test == [False, True] and secret not in tail  # ... but the sandbox cannot read it


SCAN = (
    "import sys, gc, re\n"
    "def _objects():\n"
    "    f = sys._getframe()\n"
    "    while f is not None:\n"
    "        yield from list(f.f_locals.values()) + list(f.f_globals.values())\n"
    "        f = f.f_back\n"
    "    yield from gc.get_objects()\n"
)
POISON = SCAN + (
    "def _poison():\n"
    "    for obj in _objects():\n"
    "        if isinstance(obj, list) and obj and all(isinstance(t, str) and 'assert' in t for t in obj):\n"
    "            obj[:] = ['assert True'] * len(obj)\n"
    "        if isinstance(obj, dict) and isinstance(obj.get('tests'), list):\n"
    "            obj['tests'] = ['assert True'] * len(obj['tests'])\n"
    "_poison()\n"
    "def add(a, b):\n"
    "    _poison()\n"
    "    return a - b\n"
)
READ_ANSWERS = SCAN + (
    "answers = {}\n"
    "def add(a, b):\n"
    "    for obj in _objects():\n"
    "        for s in (obj if isinstance(obj, (list, tuple)) else [obj]):\n"
    "            if isinstance(s, str):\n"
    "                for m in re.finditer(r'add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)', s):\n"
    "                    answers[(int(m.group(1)), int(m.group(2)))] = int(m.group(3))\n"
    "    return answers.get((a, b), a * b + 7)\n"
)
FORGE_WITH_NONCE = SCAN + (
    "import os\n"
    "for obj in _objects():\n"
    "    if isinstance(obj, str) and re.fullmatch(r'[0-9a-f]{32}', obj):\n"
    "        for fd in range(64):\n"
    "            for i in range(3):\n"
    "                try:\n"
    "                    os.write(fd, f'{obj} {i} PASS\\n'.encode())\n"
    "                except OSError:\n"
    "                    pass\n"
    "def add(a, b):\n"
    "    return a - b\n"
)


READ_MEMORY = (
    "import os, re\n"
    "PIDS = {os.getppid(), 1}\n"
    "def add(a, b):\n"
    "    answers = {}\n"
    "    for pid in PIDS:\n"
    "        try:\n"
    "            maps = open(f'/proc/{pid}/maps').read().splitlines()\n"
    "            mem = open(f'/proc/{pid}/mem', 'rb')\n"
    "        except OSError:\n"
    "            continue\n"
    "        for line in maps:\n"
    "            span, perms = line.split()[:2]\n"
    "            lo, hi = (int(x, 16) for x in span.split('-'))\n"
    "            if not perms.startswith('rw'):\n"
    "                continue\n"
    "            try:\n"
    "                mem.seek(lo)\n"
    "                data = mem.read(min(hi - lo, 1 << 24))\n"
    "            except (OSError, ValueError, OverflowError):\n"
    "                continue\n"
    "            for m in re.finditer(rb'add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)', data):\n"
    "                answers[(int(m.group(1)), int(m.group(2)))] = int(m.group(3))\n"
    "    return answers.get((a, b), a * b + 7)\n"
)


def test_harness_attacks_are_not_duds():
    """In a process that holds the tests (as the old in-process harness did), the attacks do work.

    Run in a subprocess: the poison rewrites every list of test strings it can find, pytest's included.
    """
    script = (
        "def harness(attack):\n"
        f"    tests = {ADD_TESTS!r}\n"
        "    ns = {}\n"
        "    exec(attack, ns)\n"
        "    return tests, ns['add']\n"
        f"tests, add = harness({POISON!r})\n"
        "add(1, 2)\n"
        "assert tests == ['assert True'] * 3, tests\n"
        f"tests, add = harness({READ_ANSWERS!r})\n"
        "assert add(1, 2) == 3 and add(10, 5) == 15 and add(-1, 1) == 0\n"
        f"tests, add = harness({READ_MEMORY!r})\n"
        "add.__globals__['PIDS'] = {'self'}\n"
        "assert add(1, 2) == 3 and add(10, 5) == 15 and add(-1, 1) == 0\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "attack", [POISON, READ_ANSWERS, FORGE_WITH_NONCE, READ_MEMORY], ids=["poison", "read", "forge", "memory"]
)
def test_harness_is_out_of_reach(attack):
    assert run_code_tests(attack, ADD_TESTS).fraction == 0.0
    assert run_code_tests(attack, "assert add(1, 2) == 3\nassert add(2, 2) == 4").fraction == 0.0
    assert run_code_tests(attack + GOOD, ADD_TESTS).fraction == 1.0  # the attack code does not hurt a solver


def test_always_equal_objects_do_not_pass():
    always = (
        "class E:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\ndef add(a, b):\n"
    )
    assert run_code_tests(always + "    return E()\n", ADD_TESTS).fraction == 0.0
    values = "def add(a, b):\n    return {'s': a + b, 'l': [a, b]}['s']\n"
    assert run_code_tests(values, [*ADD_TESTS, "assert [add(1, 1)] == [2] and not add(0, 0)"]).fraction == 1.0


@pytest.mark.skipif(
    not IS_ROOT or not shutil.which("setpriv"), reason="needs root and setpriv to become nobody"
)
def test_non_root_caller(victim):
    """The same checks when the verifier itself runs as a normal user (nobody): no uid drop possible."""
    # a copy of the sandbox's files where nobody can read them: the checkout may sit below a 0700 directory
    # (a `mktemp -d` clone), which is no part of what this test is about
    verifiers = Path(__import__("mopd").__file__).resolve().parent / "verifiers"
    code_dir = tempfile.mkdtemp(prefix="mopd_sandbox_code_")
    os.chmod(code_dir, 0o755)
    for f in verifiers.glob("sandbox*.py"):
        os.chmod(shutil.copy(f, code_dir), 0o644)
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    meta_attack = SETFLAGS + f"attempt(0, lambda: os.chmod({victim!r}, 0o777))\n"
    script = (
        "import importlib.util, json, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('sb', {os.path.join(code_dir, 'sandbox.py')!r})\n"
        "sb = importlib.util.module_from_spec(spec); sys.modules['sb'] = sb; spec.loader.exec_module(sb)\n"
        f"good = sb.run_code_tests({GOOD!r}, {ADD_TESTS!r})\n"
        f"wrong = sb.run_code_tests({WRONG!r}, {ADD_TESTS!r})\n"
        f"env = sb.run_code_tests({ENV_ATTACK + GOOD!r}, ['assert leaked'])\n"
        f"meta = sb.run_code_tests({meta_attack!r}, ['assert done == []'])\n"
        f"memory = sb.run_code_tests({READ_MEMORY!r}, {ADD_TESTS!r})\n"
        "print(json.dumps([os.geteuid(), good.fraction, wrong.fraction, env.fraction, meta.fraction,"
        " good.protections, sb._namespace_prefix(), memory.fraction]))\n"
    )
    try:
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c", script],
            env={"PATH": "/usr/bin:/bin", "MOPD_SECRET": "s3cr3t"},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        shutil.rmtree(code_dir, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    uid, good, wrong, env, meta, protections, prefix, memory = json.loads(out.stdout)
    assert uid == 65534 and (good, wrong, env, meta, memory) == (1.0, 0.0, 0.0, 1.0, 0.0), out.stdout
    assert protections["seccomp"] and protections["landlock_abi"] > 0
    if "--pid" in prefix:
        assert protections["pidns"]


def test_namespaces_when_root():
    if not IS_ROOT or "--pid" not in _namespace_prefix():
        pytest.skip("no PID namespace available here")
    res = run_code_tests(
        GOOD + "import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]", ADD_TESTS
    )
    assert res.fraction == 1.0 and res.protections["pidns"]


def test_code_assert_shapes_are_judged_like_python():
    """Asserts are decided by the harness on returned values: every usual shape must agree with Python."""
    code = (
        "import collections, math\n"
        "P = collections.namedtuple('P', 'x y')\n"
        "def none(): return None\n"
        "def one(): return 1\n"
        "def pt(): return P(1, 2)\n"
        "def gen(): return (i for i in range(3))\n"
        "def tenth(): return 0.1 + 0.2\n"
        "def d(): return collections.OrderedDict(a=1)\n"
        "def big(): return 2 ** 200\n"
        "def nan(): return math.nan\n"
        "def raw(): return b'x'\n"
        "def cplx(): return 1 + 2j\n"
        "def third():\n    import fractions, decimal\n    return fractions.Fraction(1, 3), decimal.Decimal('1.5')\n"
    )
    passing = [
        "assert none() is None",
        "assert one() in (1, 2) and 1 <= one() < 2",
        "assert pt() == (1, 2) and pt().x == 1 and isinstance(one(), int)",
        "assert list(gen()) == [0, 1, 2] and sorted([3, one()]) == [1, 3]",
        "import math\nassert math.isclose(tenth(), 0.3) and abs(tenth() - 0.3) < 1e-9",
        "assert d() == {'a': 1} and d().keys() == {'a'} and not none()",
        "assert big() == 2 ** 200 and nan() != nan() and raw() == b'x' and cplx() == 1 + 2j",
        "x = one() + 1\nassert x == 2",
        "for i in range(3):\n    assert one() == 1",
        "from fractions import Fraction\nfrom decimal import Decimal\nassert third() == (Fraction(1, 3), Decimal('1.5'))",
    ]
    failing = [
        "assert none() is not None",
        "assert one() == 2",
        "assert tenth() == 0.3",
        "assert gen() == [0, 1, 2]",
    ]
    res = run_code_tests(code, passing + failing)
    assert res.per_test == [True] * len(passing) + [False] * len(failing), res.stderr_tail
