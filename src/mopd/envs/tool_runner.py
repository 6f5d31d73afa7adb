"""Running a turn's tool calls: all of them at once, each on a thread or in a worker process, under a time limit.

Why started and awaited apart (`start_calls`, then `PendingCalls.results`): the multi-turn sampler starts the
calls of every row whose turn ended at a decode step, runs the next forward of the batch while they work, and
only then waits; calls of one turn, and of all rows that ended a turn at the same step, run concurrently. The
results come back in call order, whatever order the calls finish in, so an episode is the same whatever the
tools' timing (exact resume depends on it).

Threads (the default) share the process: a tool sees and may change its episode's state, and costs nothing to
start; a hung thread cannot be killed, so after its time limit it is abandoned (a daemon thread) and the
observation is `err:timeout`. Worker processes (`Limits.tool_processes`) are forked per call, so the tool sees the
program as it is (plugin modules, closures, the episode's state) without pickling it, and a call still running
at its time limit is killed (SIGKILL) and reaped, not abandoned. In a process a tool's changes to the state stay
in that process: a stateful tool that writes its state runs on threads. Forking costs a few milliseconds per
call (the parent's page tables are copied), and POSIX only; a tool that itself runs torch in the forked child may
hang on the thread pool it inherited, and is then killed at its limit like any other.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from dataclasses import dataclass
from typing import Any

from .tools import CallError, ToolCall, ToolContext, ToolResult, call_tool, error_result, finished


def _thread_call(call: ToolCall, context: ToolContext | None, box: dict[str, Any]) -> None:
    try:
        box["value"] = call_tool(call, context)
    except BaseException as e:  # noqa: BLE001 - a tool's failure is an observation, whatever it is
        box["error"] = e


def _process_call(call: ToolCall, context: ToolContext | None, max_chars: int, conn: Any) -> None:
    """In the forked worker: the result (cut to one character past the limit, so that a 1 MB result does not
    cross the pipe) or the failure's type name."""
    try:
        text, reward = call_tool(call, context)
        conn.send(("ok", text[: max_chars + 1], reward))
    except BaseException as e:  # noqa: BLE001 - a tool's failure is an observation, whatever it is
        conn.send(("err", type(e).__name__.lower(), 0.0))


@dataclass
class _Started:
    deadline: float
    thread: threading.Thread | None = None
    box: dict[str, Any] | None = None
    process: Any = None
    conn: Any = None


class PendingCalls:
    """A turn's calls, started; `results()` waits for each until its own deadline and returns them in order."""

    def __init__(self, calls: list[ToolCall | CallError], context: ToolContext | None, *, time_limit_s: float,
                 max_chars: int, processes: bool) -> None:
        self.calls, self.max_chars = calls, max_chars
        self.started: list[_Started | None] = []
        for call in calls:
            if isinstance(call, CallError):
                self.started.append(None)
                continue
            deadline = time.monotonic() + time_limit_s
            if processes:
                ctx = multiprocessing.get_context("fork")
                mine, theirs = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_process_call, args=(call, context, max_chars, theirs), daemon=True,
                                   name=f"mopd-tool-{call.tool.name}")
                proc.start()
                theirs.close()
                self.started.append(_Started(deadline, process=proc, conn=mine))
            else:
                box: dict[str, Any] = {}
                thread = threading.Thread(target=_thread_call, args=(call, context, box), daemon=True,
                                          name=f"mopd-tool-{call.tool.name}")
                thread.start()
                self.started.append(_Started(deadline, thread=thread, box=box))

    def done(self) -> bool:
        """Whether `results()` would return now: every call finished, or past its time limit."""
        now = time.monotonic()
        for s in self.started:
            if s is None or now >= s.deadline:
                continue
            if s.thread is not None and s.thread.is_alive():
                return False
            if s.process is not None and not s.conn.poll(0):
                return False
        return True

    def results(self) -> list[ToolResult]:
        return [self._result(call, s) for call, s in zip(self.calls, self.started, strict=True)]

    def _result(self, call: ToolCall | CallError, s: _Started | None) -> ToolResult:
        if isinstance(call, CallError) or s is None:
            return ToolResult(call.message, error=True)  # type: ignore[union-attr]
        remaining = max(0.0, s.deadline - time.monotonic())
        if s.thread is not None:
            s.thread.join(remaining)
            if s.thread.is_alive():
                return ToolResult("err:timeout", error=True)
            assert s.box is not None
            if "error" in s.box:
                return error_result(s.box["error"])
            return finished(*s.box["value"], self.max_chars)
        try:
            got = s.conn.recv() if s.conn.poll(remaining) else None
        except (EOFError, OSError):  # the worker died without answering (killed by the OS, os._exit)
            got = ("err", "workerdied", 0.0)
        finally:
            s.conn.close()
            if s.process.is_alive():
                s.process.kill()  # past its time limit: killed, not abandoned
            s.process.join()
        if got is None:
            return ToolResult("err:timeout", error=True)
        kind, text, reward = got
        return finished(text, reward, self.max_chars) if kind == "ok" else ToolResult(f"err:{text}", error=True)


def start_calls(calls: list[ToolCall | CallError], context: ToolContext | None, *, time_limit_s: float,
                max_chars: int, processes: bool = False) -> PendingCalls:
    """Start every call of a turn at once (a `CallError` is its own result); wait with `.results()`."""
    return PendingCalls(calls, context, time_limit_s=time_limit_s, max_chars=max_chars, processes=processes)
