"""Verifiers for real domains: math (math-verify), sandboxed Python code, instruction constraints."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from mopd.verifiers import (
    CONSTRAINT_TYPES,
    check_constraint,
    code_reward,
    extract_boxed,
    extract_code,
    instruction_reward,
    math_reward,
    run_code_tests,
    sandbox_info,
    validate_constraints,
)

# ---------------------------------------------------------------------------------------------- math

needs_math_verify = pytest.mark.skipif(
    __import__("importlib").util.find_spec("math_verify") is None, reason="math-verify not installed"
)


@needs_math_verify
@pytest.mark.parametrize(
    ("completion", "reference"),
    [
        ("So the answer is \\boxed{42}.", "42"),
        ("The answer is 42.", "42"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("The probability is 0.5", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{7}{2}}", "3.5"),
        ("$2\\sqrt{2}$", "\\sqrt{8}"),
        ("\\boxed{1,000}", "1000"),
        ("In total 1,000 dollars", "1000"),
        ("\\boxed{1000}", "1,000"),
        ("first I thought \\boxed{3}, but actually \\boxed{4}", "4"),
        ("\\boxed{4} and then some words with 7 in them", "4"),
        ("We get 3, then 5, total 8", "8"),
        ("\\boxed{x = 5}", "5"),
        ("\\boxed{12 \\text{ dollars}}", "12"),
        ("\\boxed{18.00}", "18"),
        ("\\boxed{2^{10}}", "1024"),
        ("\\boxed 7.", "7"),
        ("\\boxed{\\frac{3}{8}}", "3/8"),
        ("The answer is $\\boxed{18}$.", "$18"),
    ],
)
def test_math_equivalent(completion, reference):
    assert math_reward(completion, reference) == 1.0


@needs_math_verify
@pytest.mark.parametrize(
    ("completion", "reference"),
    [
        ("\\boxed{41}", "42"),
        ("\\boxed{-3}", "3"),
        ("first \\boxed{3} then \\boxed{4}", "3"),
        ("\\boxed{0.333}", "\\frac{1}{3}"),
        ("\\boxed{\\frac{3}{4", "0.75"),  # truncated box
        ("", "3"),
        ("   ", "3"),
        ("garbage ]]]{{{\\frac \\boxed{", "1"),
        ("\\boxed{\\boxed{\\boxed{", "1"),
        ("no numbers here at all", "5"),
    ],
)
def test_math_wrong_or_garbage(completion, reference):
    assert math_reward(completion, reference) == 0.0


@needs_math_verify
def test_math_never_raises_on_odd_inputs():
    for completion, reference in [
        (None, "1"),
        (123, "123"),
        ("\\boxed{3}", None),
        ("\\boxed{3}", ""),
        ("\x00\xff" * 50, "1"),
        ("{" * 5000, "1"),
        ("\\frac{" * 2000, "2"),
    ]:
        assert math_reward(completion, reference) in (0.0, 1.0)


@needs_math_verify
def test_math_explosive_answers_are_fast_zero():
    start = time.monotonic()
    for completion in ("\\boxed{10^{10^{10^{10}}}}", "9**9**9**9", "\\boxed{100000!}", "\\boxed{2^{10^{9}}}"):
        assert math_reward(completion, "1") == 0.0
    assert time.monotonic() - start < 3.0


@needs_math_verify
def test_math_works_off_the_main_thread():
    results = []

    def worker():
        results.append(math_reward("\\boxed{\\frac{1}{2}}", "0.5"))
        results.append(math_reward("\\boxed{\\frac{1}{3}}", "0.5"))

    t = threading.Thread(target=worker)
    t.start()
    t.join(30)
    assert results == [1.0, 0.0]


def test_extract_boxed():
    assert extract_boxed("a \\boxed{1} b \\boxed{\\frac{2}{3}} c") == "\\frac{2}{3}"
    assert extract_boxed("\\fbox{9}") == "9"
    assert extract_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert extract_boxed("\\boxed{5} then \\boxed{6") == "5"  # last one is unbalanced
    assert extract_boxed("nothing") is None
    assert extract_boxed(None) is None


# ---------------------------------------------------------------------------------------------- code

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]


def test_extract_code():
    assert extract_code("```python\ndef f():\n    return 1\n```") == "def f():\n    return 1"
    assert extract_code("Here:\n```py\nx = 1\n```\ndone") == "x = 1"
    assert extract_code("def g(): pass") == "def g(): pass"
    text = "```python\ndef f(x):\n    return x\n```\nUsage:\n```python\nprint(f(3))\n```"
    assert extract_code(text).startswith("def f")  # the defining block, not the usage example
    assert extract_code("```\ny = 2\n```") == "y = 2"
    assert extract_code("```python\ndef h():\n    return 2") == "def h():\n    return 2"  # truncated
    assert extract_code("```bash\nrm -rf /\n```") == ""
    assert extract_code(None) == ""


def test_code_correct_wrong_partial():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    assert code_reward(good, ADD_TESTS) == 1.0
    assert code_reward(good, "assert add(1, 2) == 3\nassert add(2, 2) == 4") == 1.0
    assert code_reward("def add(a, b):\n    return a - b", ADD_TESTS) == 0.0
    assert code_reward("def add(a, b):\n    return a - b", "assert add(1, 2) == 3") == 0.0
    partial = "def add(a, b):\n    return 3 if a == 1 else a * b"  # passes only the first test
    assert code_reward(partial, ADD_TESTS) == pytest.approx(1 / 3)
    assert code_reward("def add(a, b) return", ADD_TESTS) == 0.0  # syntax error
    assert code_reward("", ADD_TESTS) == 0.0
    with pytest.raises(ValueError):
        code_reward(good, [])
    with pytest.raises(ValueError):
        code_reward(good, "   ")


def test_code_test_errors_are_isolated_per_test():
    res = run_code_tests(
        "def f(x):\n    return 1 / x", ["assert f(1) == 1", "assert f(0) == 0", "assert f(2) == 0.5"]
    )
    assert res.per_test == [True, False, True]
    assert "ZeroDivisionError" in res.stderr_tail


def test_code_infinite_loop_times_out():
    start = time.monotonic()
    res = run_code_tests("while True:\n    pass", "assert True", timeout_s=1.0)
    assert res.fraction == 0.0 and res.timed_out
    assert time.monotonic() - start < 4.0


def test_code_hanging_test_keeps_earlier_passes():
    res = run_code_tests(
        "def f():\n    return 1", ["assert f() == 1", "while True: pass", "assert f() == 1"], timeout_s=1.0
    )
    assert res.per_test == [True, False, False] and res.timed_out


def _processes() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def test_code_fork_bomb_is_contained():
    info = sandbox_info()
    if not info.get("seccomp") and os.geteuid() == 0:
        pytest.skip("no seccomp here and running as root: RLIMIT_NPROC would not stop a real fork bomb")
    before = _processes()
    start = time.monotonic()
    bomb = "import os\nwhile True:\n    os.fork()"
    assert code_reward(bomb, "assert True", timeout_s=2.0) == 0.0
    stubborn = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    assert code_reward(stubborn, "assert True", timeout_s=1.0) == 0.0
    assert time.monotonic() - start < 8.0
    # The machine is fine: we can still fork, and nothing the sandbox started is left running.
    assert subprocess.run(["true"], timeout=10).returncode == 0
    time.sleep(0.1)
    leftovers = _processes() - before
    assert len(leftovers) < 5, leftovers
    # subprocess (a fork) is refused inside, threads still work.
    assert code_reward("import subprocess\nsubprocess.run(['true'])", "assert True") == 0.0
    threads = (
        "import threading\nout = []\nt = threading.Thread(target=lambda: out.append(1))\nt.start()\nt.join()"
    )
    assert code_reward(threads, "assert out == [1]") == 1.0


def test_code_memory_limit():
    hog = "data = bytearray(2 * 1024 ** 3)"
    assert code_reward(hog, "assert len(data) > 0", memory_mb=256) == 0.0
    modest = "data = bytearray(50 * 1024 ** 2)"
    assert code_reward(modest, "assert len(data) == 50 * 1024 ** 2", memory_mb=512) == 1.0


def test_code_network_is_blocked():
    assert code_reward("import socket\ns = socket.socket()", "assert True") == 0.0
    assert (
        code_reward("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)", "assert True")
        == 0.0
    )
    # Bypass the Python-level block with raw libc calls: the kernel layers must stop it.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    raw = (
        "import ctypes, struct\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = libc.socket(2, 1, 0)\n"
        f"addr = struct.pack('=H', 2) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n"
        "connected = fd >= 0 and libc.connect(fd, addr, 16) == 0\n"
    )
    try:
        info = sandbox_info()
        if info.get("seccomp") or info.get("netns") or info.get("landlock_abi", 0) >= 4:
            assert code_reward(raw, "assert connected") == 0.0
            with pytest.raises(BlockingIOError):
                server.accept()
    finally:
        server.close()


def test_code_filesystem_writes_outside_tempdir():
    target = os.path.join(tempfile.gettempdir(), f"mopd_pwned_{secrets.token_hex(8)}")
    code = (
        "import os, sys\n"
        "print(os.getcwd(), file=sys.stderr)\n"
        "open('inside.txt', 'w').write('ok')\n"
        f"open({target!r}, 'w').write('pwned')\n"
    )
    try:
        res = run_code_tests(code, "assert open('inside.txt').read() == 'ok'")
        cwd = res.stderr_tail.splitlines()[0].strip()
        # Always: the code ran in a fresh private temp dir that is gone afterwards.
        assert os.path.basename(cwd).startswith("mopd_sandbox_")
        assert not os.path.exists(cwd)
        if res.protections.get("landlock_abi", 0) > 0:
            assert not os.path.exists(target)  # blocked by Landlock
            assert res.fraction == 0.0
        # Without Landlock, writes elsewhere are NOT blocked (documented in mopd.verifiers.sandbox).
    finally:
        if os.path.exists(target):
            os.unlink(target)
    assert code_reward("open('a.txt', 'w').write('x')", "assert open('a.txt').read() == 'x'") == 1.0


def test_code_cannot_forge_results():
    tests = ["assert False", "assert 1 == 2"]
    fake_lines = (
        "import os\n"
        "for fd in range(1, 20):\n"
        "    try:\n"
        "        os.write(fd, b'0 PASS\\n1 PASS\\nPASS\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "print('0 PASS')\n"
    )
    assert code_reward(fake_lines, tests) == 0.0
    assert code_reward("import os\nos._exit(0)", "assert False") == 0.0  # exit status is not trusted
    assert code_reward("import sys\nsys.exit(0)", "assert False") == 0.0
    patch_exec = (
        "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None"
    )
    assert code_reward(patch_exec, tests) == 0.0
    patch_write = (
        "import os\n_w = os.write\nos.write = lambda fd, data: _w(fd, data.replace(b'FAIL', b'PASS'))"
    )
    assert code_reward(patch_write, tests) == 0.0


def test_code_reward_is_thread_safe():
    good = "def add(a, b):\n    return a + b"
    out: list[float] = []
    threads = [threading.Thread(target=lambda: out.append(code_reward(good, ADD_TESTS))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == [1.0] * 4


# -------------------------------------------------------------------------------------- instructions

RULE_CASES = {
    "max_words": ({"n": 3}, "one two three", "one two three four"),
    "min_words": ({"n": 3}, "one two three", "one two"),
    "max_chars": ({"n": 5}, "  hello  ", "hello!"),
    "forbidden_words": ({"words": ["cat", "big dog"]}, "a concatenation of dogs", "The Cat sat"),
    "required_words": ({"words": ["cat", "big dog"]}, "My cat met a BIG DOG.", "my cat met a dog"),
    "starts_with": ({"text": "Yes"}, "  yes, indeed", "Well, yes"),
    "ends_with": ({"text": "ride on"}, "so ride on  ", "ride on, friend"),
    "all_lowercase": ({}, "all quiet here, 42.", "Not quiet"),
    "all_uppercase": ({}, "STOP RIGHT THERE!", "STOP right there"),
    "json_format": ({}, '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
    "bullet_points": ({"n": 2}, "Intro\n* one\n- two\n**bold** text", "* one\n* two\n* three"),
    "num_paragraphs": ({"n": 2}, "First para.\nStill first.\n\n  \nSecond.", "Only one\nparagraph."),
    "no_commas": ({}, "No commas here.", "One, two"),
}


def test_every_rule_has_cases():
    assert set(RULE_CASES) == set(CONSTRAINT_TYPES)


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_instruction_rule_pass_and_fail(rule):
    params, good, bad = RULE_CASES[rule]
    constraint = {"type": rule, **params}
    assert check_constraint(good, constraint) is True
    assert check_constraint(bad, constraint) is False


def test_instruction_rule_details():
    assert (
        check_constraint("Yes sir", {"type": "starts_with", "text": "yes", "case_sensitive": True}) is False
    )
    assert check_constraint("123 456", {"type": "all_lowercase"}) is False  # no letters
    assert check_constraint("42", {"type": "json_format"}) is False  # JSON, but not an object or array
    assert check_constraint("[1, 2]", {"type": "json_format"}) is True
    assert check_constraint("a，b", {"type": "no_commas"}) is False  # full-width comma
    assert check_constraint("don't stop-motion", {"type": "max_words", "n": 2}) is True


def test_instruction_reward_fraction():
    constraints = [
        {"type": "max_words", "n": 5},
        {"type": "no_commas"},
        {"type": "all_lowercase"},
        {"type": "starts_with", "text": "hello"},
    ]
    assert instruction_reward("hello there friend", constraints) == 1.0
    assert instruction_reward("Hello, there friend", constraints) == 0.5
    assert instruction_reward(None, constraints) == 0.0


@pytest.mark.parametrize(
    ("constraints", "message"),
    [
        ([{"type": "max_word", "n": 3}], "unknown type 'max_word'"),
        ([{"n": 3}], "unknown type None"),
        ([{"type": "max_words"}], "missing parameter 'n'"),
        ([{"type": "max_words", "n": "3"}], "'n' must be a non-negative integer"),
        ([{"type": "max_words", "n": True}], "'n' must be a non-negative integer"),
        ([{"type": "no_commas", "n": 1}], "unexpected parameter 'n'"),
        ([{"type": "forbidden_words", "words": []}], "'words' must be a non-empty list"),
        (
            [{"type": "starts_with", "text": "x", "case_sensitive": "yes"}],
            "'case_sensitive' must be true or false",
        ),
        ([], "non-empty list"),
        ("max_words", "non-empty list"),
        (["max_words"], "expected a dict"),
    ],
)
def test_validate_constraints_errors(constraints, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate_constraints(constraints)
    with pytest.raises(ValueError):
        instruction_reward("text", constraints)


def test_validate_constraints_drops_null_fields():
    # parquet / datasets fill absent struct fields with None
    assert validate_constraints([{"type": "max_words", "n": 3, "words": None}]) == [
        {"type": "max_words", "n": 3}
    ]
