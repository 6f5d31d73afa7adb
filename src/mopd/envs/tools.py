"""Tools an agent calls: plain Python functions with a name, a docstring and typed arguments.

Two call formats, one per kind of tokenizer (docs/AGENTS.md):

* the tiny character models write `name:arg1,arg2` as a whole turn (e.g. `mul:123,45`, `get:qwk`): only
  characters of the built-in alphabet, so no token id changes. A turn whose text starts with `word:` is a tool
  call attempt; any other turn is the final answer.
* real chat models write `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes / Qwen format
  that their chat templates describe when given `tools=`), with the schema of `tool_schema`.

A turn may hold several calls (`parse_calls`): chat models write several `<tool_call>` blocks, the character
models several `name:args` calls one space apart (`get:qwk get:abc`); each gets its own result, in call order.

A tool that needs its episode declares a parameter annotated `ToolContext`: it receives the problem and the
episode's state (what the domain's `setup` returned), and that parameter is not part of the tool's schema. A tool
may return `ToolReply(text, reward)` to give a per-turn reward beside its observation.

`run_tool` runs one call in-process on a worker thread with a time limit: a tool that raises, hangs or returns
text longer than a limit gives an error or truncated observation, never an exception in the rollout. A hung
tool's thread cannot be killed in Python; it is abandoned (a daemon thread) and the episode goes on. Calls that
must be killable run in worker processes instead (`envs.tool_runner`, `Limits.tool_processes`).
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


@dataclass
class ToolContext:
    """What a tool that declares a `ToolContext` parameter receives: the episode's problem and its state (what
    the domain's `setup(problem)` returned, None without one). Calls of one turn run at the same time, so a
    tool that writes the state should write only what no other call of the turn reads."""

    problem: Any  # envs.base.Problem (not imported: tools sit below the domain registry)
    state: Any = None


@dataclass(frozen=True)
class ToolReply:
    """A tool's result with a per-turn reward (added to the episode's reward, `envs.episode.ToolEpisode`)."""

    text: str
    reward: float = 0.0


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    description: str
    params: tuple[tuple[str, type], ...]  # (name, type) in signature order, the ones the model writes
    context_arg: str | None = None  # the parameter that receives the episode's `ToolContext`, if any


def tool(fn: Callable[..., Any], name: str | None = None) -> Tool:
    """A `Tool` from a function: its name (or `name`), its docstring's first line and its annotated arguments
    (int, float, str or bool each; anything else is refused here, not at call time). One parameter annotated
    `ToolContext` receives the episode's problem and state instead of a model-written value."""
    hints = get_type_hints(fn)
    params, context_arg = [], None
    for p in inspect.signature(fn).parameters.values():
        t = hints.get(p.name)
        if t is ToolContext and context_arg is None:
            context_arg = p.name
            continue
        if t not in ARG_TYPES:
            raise TypeError(f"tool {fn.__name__}: argument {p.name!r} needs an int, float, str or bool annotation "
                            "(or ToolContext, once)")
        params.append((p.name, t))
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    return Tool(name=name or fn.__name__, fn=fn, description=doc[0] if doc else "", params=tuple(params),
                context_arg=context_arg)


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
    return None if m is None else _chat_body(m.group(1), tools)


def parse_calls(text: str, tools: dict[str, Tool], *, chat: bool,
                max_calls: int) -> list[ToolCall | CallError] | None:
    """Every call of a turn, in order; None when the turn is not a call attempt (a final answer).

    Chat: each `<tool_call>` block. Character models: `name:args` calls one space apart, when every
    space-separated piece starts `name:`; otherwise the whole turn is one call (`mul:12, 3` stays one call).
    Calls past `max_calls` are errors the model reads (`err:at most N calls a turn`), not dropped in silence.
    """
    if chat:
        bodies = _CHAT_CALL.findall(text)
        if not bodies:
            return None
        calls = [_chat_body(b, tools) for b in bodies]
    else:
        if _CHAR_CALL.match(text) is None:
            return None
        pieces = text.split()
        many = len(pieces) > 1 and all(_CHAR_CALL.match(p) for p in pieces)
        calls = [parse_char_call(p, tools) for p in (pieces if many else [text])]  # type: ignore[misc]
    over = CallError(f"err:at most {max_calls} calls a turn")
    return [c if i < max_calls else over for i, c in enumerate(calls)]


def _chat_body(body: str, tools: dict[str, Tool]) -> ToolCall | CallError:
    try:
        call = json.loads(body)
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
    reward: float = 0.0  # the tool's per-turn reward (`ToolReply`)


def call_tool(call: ToolCall, context: ToolContext | None) -> tuple[str, float]:
    """Run `call` here and now: its text and per-turn reward. Raises whatever the tool raises, or the error of a
    result whose text cannot be made (a reward that is not a finite number is a ValueError)."""
    args = dict(call.args)
    if call.tool.context_arg is not None:
        args[call.tool.context_arg] = context
    value = call.tool.fn(**args)
    if isinstance(value, ToolReply):
        reward = value.reward
        if isinstance(reward, bool) or not isinstance(reward, int | float) or reward != reward:
            raise ValueError(f"tool {call.tool.name}: reward {reward!r} is not a number")
        return str(value.text), float(reward)
    return str(value), 0.0


def error_result(e: BaseException) -> ToolResult:
    """A tool's failure as the observation the model reads (a tool that raises `TimeoutError` timed out)."""
    return ToolResult("err:timeout" if isinstance(e, TimeoutError) else f"err:{type(e).__name__.lower()}", error=True)


def finished(text: str, reward: float, max_chars: int) -> ToolResult:
    """A tool's text cut to `max_chars` (flagged truncated), with its per-turn reward."""
    if len(text) > max_chars:
        return ToolResult(text[:max_chars], error=False, truncated=True, reward=reward)
    return ToolResult(text, error=False, reward=reward)


def run_tool(call: ToolCall, *, time_limit_s: float, max_chars: int,
             context: ToolContext | None = None) -> ToolResult:
    """Run `call` on a daemon thread for at most `time_limit_s`; its result as text of at most `max_chars`."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call_tool(call, context)
        except BaseException as e:  # noqa: BLE001 - a tool's failure is an observation, whatever it is
            box["error"] = e

    worker = threading.Thread(target=target, name=f"mopd-tool-{call.tool.name}", daemon=True)
    worker.start()
    worker.join(time_limit_s)
    if worker.is_alive():
        return ToolResult("err:timeout", error=True)
    if "error" in box:
        return error_result(box["error"])
    return finished(*box["value"], max_chars)
