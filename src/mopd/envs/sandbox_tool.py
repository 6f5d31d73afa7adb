"""The code sandbox as a tool: the model writes a Python program, the tool runs it and answers with its output.

It reuses the code verifier's sandbox (`verifiers.sandbox.run_code_tests`: a fresh temporary directory, no
network, an unprivileged worker, resource limits, the whole process group killed at its wall-clock limit), so a
program that loops forever or forks is stopped there, not in the rollout. The program's standard output is sent
to the sandbox's standard error, the one stream it returns (its last 4,000 characters); an exception reads as
its last traceback line (`ZeroDivisionError: division by zero`), a program past its time limit as
`err:timeout` (a tool error). The program runs with the standard library only (`python -I -S`).

Each call starts a sandboxed interpreter (about 0.1 s measured here), so the domain's `Limits.tool_time_s`
should exceed the sandbox's `timeout_s`: the sandbox then reports its own timeout first, and the tool's thread
is never abandoned.
"""

from __future__ import annotations

from ..verifiers.sandbox import run_code_tests
from .tools import Tool, tool

_PRELUDE = "import sys as _mopd_sys\n_mopd_sys.stdout = _mopd_sys.stderr\n"
_WORKER_FRAME = "sandbox_worker.py"


def run_program(code: str, *, timeout_s: float = 2.0, memory_mb: int = 256) -> str:
    """Run `code` in the sandbox; what it printed, or its error's last line. Raises TimeoutError (the
    observation `err:timeout`, a tool error) when the sandbox killed it at `timeout_s`."""
    result = run_code_tests(_PRELUDE + code, ["assert True"], timeout_s=timeout_s, memory_mb=memory_mb)
    if result.timed_out:
        raise TimeoutError(f"the program ran past {timeout_s} s")
    out = result.stderr_tail.rstrip("\n")
    if "Traceback (most recent call last):" in out:  # the program raised: what it printed, then the error line
        printed, _, trace = out.partition("Traceback (most recent call last):")
        last = [line for line in trace.strip().splitlines() if line.strip()][-1:]
        return printed + "".join(last).strip()
    return out


def python_tool(*, timeout_s: float = 2.0, memory_mb: int = 256, name: str = "python") -> Tool:
    """A tool `python(code)` that runs a program in the code sandbox and answers with its output."""

    def python(code: str) -> str:
        """Run a Python program (standard library only) and return what it prints."""
        return run_program(code, timeout_s=timeout_s, memory_mb=memory_mb)

    return tool(python, name=name)
