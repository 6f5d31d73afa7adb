"""Tools an agent calls: plain Python functions with a name, a docstring and typed arguments.

Two call formats, one per kind of tokenizer (docs/AGENTS.md):

* the tiny character models write `name:arg1,arg2` as a whole turn (e.g. `mul:123,45`, `get:qwk`): only
  characters of the built-in alphabet, so no token id changes. A turn whose text starts with `word:` is a tool
  call attempt; any other turn is the final answer.
* real chat models write `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes / Qwen format
  that their chat templates describe when given `tools=`), with the schema of `tool_schema`.

A tool runs in-process on a worker thread with a time limit (`run_tool`): a tool that raises, hangs or returns
text longer than a limit gives an error or truncated observation, never an exception in the rollout. A hung
tool's thread cannot be killed in Python; it is abandoned (a daemon thread) and the episode goes on.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

ARG_TYPES: dict[type, str] = {int: "integer", float: "number", str: "string", bool: "boolean"}
_CHAR_CALL = re.compile(r"^\s*([a-z_][a-z0-9_]*):(.*)$", re.DOTALL)
_CHAT_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    description: str
    params: tuple[tuple[str, type], ...]  # (name, type) in signature order


def tool(fn: Callable[..., Any], name: str | None = None) -> Tool:
    """A `Tool` from a function: its name (or `name`), its docstring's first line and its annotated arguments
    (int, float, str or bool each; anything else is refused here, not at call time)."""
    hints = get_type_hints(fn)
    params = []
    for p in inspect.signature(fn).parameters.values():
        t = hints.get(p.name)
        if t not in ARG_TYPES:
            raise TypeError(f"tool {fn.__name__}: argument {p.name!r} needs an int, float, str or bool annotation")
        params.append((p.name, t))
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    return Tool(name=name or fn.__name__, fn=fn, description=doc[0] if doc else "", params=tuple(params))


def tool_schema(t: Tool) -> dict[str, Any]:
    """The JSON schema chat templates take in `apply_chat_template(tools=[...])`."""
    props = {n: {"type": ARG_TYPES[ty]} for n, ty in t.params}
    return {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": {
        "type": "object", "properties": props, "required": [n for n, _ in t.params]}}}


@dataclass(frozen=True)
class ToolCall:
    tool: Tool
    args: dict[str, Any]


@dataclass(frozen=True)
class CallError:
    """A tool call attempt that cannot run: unknown tool, wrong argument count or type. `message` is the
    observation the model gets back."""

    message: str


def _coerce(value: Any, t: type) -> Any:
    if t is bool:
        if isinstance(value, bool):
            return value
        if str(value).strip() in ("true", "false"):
            return str(value).strip() == "true"
        raise ValueError(value)
    if t is int and isinstance(value, float):
        raise ValueError(value)
    return t(value.strip() if isinstance(value, str) else value)


def _bind(tools: dict[str, Tool], name: str, values: list[Any] | dict[str, Any]) -> ToolCall | CallError:
    t = tools.get(name)
    if t is None:
        return CallError(f"err:unknown tool {name}")
    if isinstance(values, list):
        if len(values) != len(t.params):
            return CallError(f"err:{name} takes {len(t.params)} args")
        values = dict(zip([n for n, _ in t.params], values, strict=True))
    if set(values) != {n for n, _ in t.params}:
        return CallError(f"err:{name} takes {','.join(n for n, _ in t.params)}")
    try:
        return ToolCall(t, {n: _coerce(values[n], ty) for n, ty in t.params})
    except (TypeError, ValueError):
        return CallError(f"err:bad args for {name}")


def parse_char_call(text: str, tools: dict[str, Tool]) -> ToolCall | CallError | None:
    """`name:a,b` -> the call; None when `text` is not a call attempt (a final answer). No arguments: `name:`."""
    m = _CHAR_CALL.match(text)
    if m is None:
        return None
    raw = m.group(2).strip()
    return _bind(tools, m.group(1), raw.split(",") if raw else [])


def parse_chat_call(text: str, tools: dict[str, Tool]) -> ToolCall | CallError | None:
    """The first `<tool_call>{json}</tool_call>` of a chat model's turn; None when the turn has none."""
    m = _CHAT_CALL.search(text)
    if m is None:
        return None
    try:
        call = json.loads(m.group(1))
        name, args = call["name"], call.get("arguments", {})
        if isinstance(args, str):
            args = json.loads(args)
    except (ValueError, KeyError, TypeError):
        return CallError("err:tool call is not json with a name and arguments")
    if not isinstance(name, str) or not isinstance(args, dict):
        return CallError("err:tool call is not json with a name and arguments")
    return _bind(tools, name, args)


@dataclass(frozen=True)
class ToolResult:
    text: str
    error: bool  # raised, timed out, or the call was malformed
    truncated: bool = False


def run_tool(call: ToolCall, *, time_limit_s: float, max_chars: int) -> ToolResult:
    """Run `call` on a daemon thread for at most `time_limit_s`; its result as text of at most `max_chars`."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call.tool.fn(**call.args)
        except BaseException as e:  # noqa: BLE001 - a tool's failure is an observation, whatever it is
            box["error"] = e

    worker = threading.Thread(target=target, name=f"mopd-tool-{call.tool.name}", daemon=True)
    worker.start()
    worker.join(time_limit_s)
    if worker.is_alive():
        return ToolResult("err:timeout", error=True)
    if "error" in box:
        return ToolResult(f"err:{type(box['error']).__name__.lower()}", error=True)
    try:
        text = str(box.get("value"))
    except Exception as e:  # noqa: BLE001 - a result whose str() fails is the tool's error too
        return ToolResult(f"err:{type(e).__name__.lower()}", error=True)
    if len(text) > max_chars:
        return ToolResult(text[:max_chars], error=False, truncated=True)
    return ToolResult(text, error=False)
