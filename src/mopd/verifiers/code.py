"""Python code verifier: score a completion by the share of assert-style tests its code passes.

What to run and how to score it lives here; how it is run (isolation, process handling, the result
protocol) lives in :mod:`mopd.verifiers.sandbox`.

Reward
------
``code_reward(completion, tests)`` extracts the code (see :func:`extract_code`) and runs it, then the
tests, in a fresh interpreter. ``tests`` is either one string of Python statements (reward 1.0 if all of
them run without raising, else 0.0) or a list of separate test snippets (reward = fraction that pass;
they share the namespace of the solution and run in order, each one on its own, so a failing or raising
test does not stop the next one; a test that hangs ends the run, and the tests after it count as failed).
Only the per-test outcomes the trusted harness reports under a secret nonce count; the process's exit
status is not used at all. The solution runs in a separate, unprivileged worker process; ``assert`` tests
are decided by the harness, which asks the worker only for the values of the solution-dependent
sub-expressions, so a solution cannot reach the tests or the expected answers.
"""

from __future__ import annotations

import re

from .sandbox import run_code_tests

__all__ = ["code_reward", "extract_code"]

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


def code_reward(
    completion: str, tests: str | list[str], *, timeout_s: float = 5.0, memory_mb: int = 512
) -> float:
    """1.0/0.0 for a string of test statements, the fraction of passing tests for a list of them.

    Never raises on a bad completion; raises ``ValueError`` for empty or malformed ``tests``.
    """
    code = extract_code(completion)
    result = run_code_tests(code, tests, timeout_s=timeout_s, memory_mb=memory_mb)
    return result.fraction
