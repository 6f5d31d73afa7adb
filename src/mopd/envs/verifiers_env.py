"""Environments written with Prime Intellect's `verifiers` (v1 API, `verifiers >= 0.4`) as mopd domains.

    domains: [{name: calc, verifiers: my_calc_env}]     # in a recipe: an installed taskset, by its id

    # or in a plugin file listed under `plugins:` (a taskset object, and a demonstration for SFT)
    from mopd.envs.verifiers_env import register_verifiers_domain
    register_verifiers_domain("calc", CalcTaskset(vf.TasksetConfig()), demonstration=...)

What comes from verifiers and what from mopd: the taskset gives the problems (each task's prompt, its reference
answer if its data has one) and the tools (its tasks' and its own `vf.Toolset`s); the task's rubric (`@vf.reward`
hooks, `Task.score`) gives every reward. mopd's policy plays the episode: its sampler writes each turn, a turn that
is a tool call in mopd's format (`envs.tools`: `name:a,b` for the tiny character models, `<tool_call>` JSON for
chat models) is run against the taskset's tool and answered with the result, and the first turn that is not a
call ends the episode, as verifiers' own chat harness does. The finished conversation is recorded as a
`vf.Trace` (assistant tool calls as OpenAI `tool_calls`, tool results as `tool` messages) and scored by the
task, without a runtime (hooks that need one are skipped by verifiers itself).

Why in-process and not verifiers' rollout machinery (`vf.Agent`): that calls the model over HTTP through an
interception server and serves each toolset from a subprocess (seconds per episode), and records no token ids
for a policy it does not serve; mopd needs its own tokens, role masks and cached multi-turn sampling, and an
episode here costs milliseconds. What this leaves out: harness-specific behaviour (`@vf.stop` hooks, user
simulators, sandboxes and runtimes) and per-task toolset state (`setup_task` is not called); toolsets run in this
process, `setup()` once when the domain is built, on one event loop per domain.

A taskset without tools is a single-turn domain (the fast single-turn sampler; `verify` scores a completion as
the assistant's one reply); with tools it is a tool-use domain (`envs.episode.Environment`). Rewards must be in
[0, 1] (a rubric's weighted sum outside it is a one-line DomainError, as for any verifier). verifiers is an
optional extra: `pip install 'mopd[verifiers]'`.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..core.schema.defaults import HELD_OUT_SEED
from .base import _REGISTRY, DomainError, Problem
from .data import held_out_split
from .episode import EpisodeStats, Limits, Reply
from .tool_runner import start_calls
from .tools import CallError, Tool, ToolCall, parse_calls

EXTRA = "pip install 'mopd[verifiers]'"
_JSON_TYPES: dict[str, type] = {"integer": int, "number": float, "string": str, "boolean": bool}


def _vf() -> Any:
    try:
        import verifiers.v1 as vf
    except ImportError:
        raise DomainError(f"a verifiers environment needs the verifiers library (>= 0.4): {EXTRA}") from None
    return vf


class _Loop:
    """One event loop on a daemon thread: toolsets keep their async state (sessions, caches) on one loop, and a
    tool call that hangs times out in its caller instead of stalling the sampler."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="mopd-verifiers-loop", daemon=True).start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()  # an async tool that overran stops here; its caller reports the timeout
            raise


def _text(result: Any) -> str:
    parts = [getattr(c, "text", "") for c in getattr(result, "content", []) if getattr(c, "type", "") == "text"]
    return "\n".join(parts)


def _mopd_tool(name: str, schema: Mapping[str, Any], description: str, call: Callable[[dict], str]) -> Tool:
    props = dict(schema.get("properties") or {})
    params = []
    for arg, spec in props.items():
        t = _JSON_TYPES.get(spec.get("type") if isinstance(spec, dict) else None)
        if t is None:
            raise DomainError(f"verifiers tool {name!r}: argument {arg!r} has type {spec!r}; mopd's tool calls take "
                              "integer, number, string or boolean arguments")
        params.append((arg, t))
    return Tool(name=name, fn=lambda **kw: call(kw), description=description.strip().splitlines()[0]
                if description.strip() else "", params=tuple(params))


@dataclass
class VerifiersDomain:
    """A verifiers taskset as a single-turn mopd domain (`DomainLike`): held-out split, training draws, rubric."""

    name: str
    taskset: Any
    tasks: list[Any] = field(default_factory=list, repr=False)  # the taskset's tasks, loaded once
    eval_size: int | None = None
    seed: int = HELD_OUT_SEED
    answer_field: str = "answer"
    description: str = ""
    difficulties: tuple[int, ...] = (1,)
    local: bool = True  # its prompts are known at load (the tokenizer check reads `characters`)
    _tasks: dict[str, Any] = field(default_factory=dict, repr=False)  # prompt -> task
    _parts: tuple[list[Problem], list[Problem]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.description = self.description or f"verifiers taskset {type(self.taskset).__name__}"
        problems: dict[str, Problem] = {}
        for i, task in enumerate(self.tasks):
            prompt = _prompt_text(task.data, f"{self.name}: task {i}")
            if prompt not in problems:  # duplicates would leak between the held-out and training parts
                answer = getattr(task.data, self.answer_field, None)
                problems[prompt] = Problem(prompt, "" if answer is None else str(answer), self.name, 1)
                self._tasks[prompt] = task
        self._parts = held_out_split(list(problems.values()), f"mopd-verifiers:{self.name}:{self.seed}",
                                     self.eval_size, self.name)
        self._refuse_runtime_rewards(self.tasks[0])

    def _refuse_runtime_rewards(self, task: Any) -> None:
        """A reward that needs a sandbox runtime would be skipped by `Task.score` (mopd scores without one), so
        every episode would silently lose that reward: one line at load instead."""
        import inspect

        for fn in task.hooks("reward"):
            runtime = inspect.signature(fn).parameters.get("runtime")
            if runtime is not None and runtime.default is inspect.Parameter.empty:
                raise DomainError(f"domain {self.name!r}: reward {fn.__name__!r} needs a verifiers runtime (a "
                                  "sandbox), which mopd does not run; give its `runtime` a default of None to "
                                  "score without one")

    # -------------------------------------------------------------------------------- domain interface

    @property
    def has_answers(self) -> bool:
        return all(p.answer for p in self._parts[0])

    def characters(self) -> set[str]:
        return {ch for part in self._parts for p in part for ch in p.prompt + p.answer}

    def sample_train(self, rng: random.Random, n: int, difficulty: int | None = None,
                     exclude: frozenset[str] = frozenset()) -> list[Problem]:
        pool = [p for p in self._parts[0] if p.prompt not in exclude]
        if not pool:
            raise DomainError(f"domain {self.name!r}: every training prompt is excluded")
        return [rng.choice(pool) for _ in range(n)]

    def eval_set(self, n: int, seed: int = HELD_OUT_SEED) -> list[Problem]:
        return self._parts[1][:n]

    def held_out_prompts(self, n: int, seed: int = HELD_OUT_SEED) -> frozenset[str]:
        return frozenset(p.prompt for p in self._parts[1])

    def verify(self, problem: Problem, completion: str) -> float:
        """The rubric's reward for `completion` as the assistant's only reply."""
        return self.score(problem, [{"role": "user", "content": problem.prompt},
                                    {"role": "assistant", "content": completion}], [])

    # ------------------------------------------------------------------------------------------ scoring

    def task(self, problem: Problem) -> Any:
        try:
            return self._tasks[problem.prompt]
        except KeyError:
            raise DomainError(f"domain {self.name!r}: no task has the prompt {problem.prompt[:40]!r}") from None

    def score(self, problem: Problem, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> float:
        """`Task.score` of the conversation (OpenAI wire messages) recorded as a trace; one DomainError line if
        a hook raises or the reward is not in [0, 1]."""
        task = self.task(problem)
        try:
            reward = asyncio.run(_score(_vf(), task, messages, tools))
        except DomainError:
            raise
        except Exception as e:  # the rubric is plugin code
            raise DomainError(f"domain {self.name!r}: its verifiers rubric raised {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        if not isinstance(reward, int | float) or not 0.0 <= reward <= 1.0:
            raise DomainError(f"domain {self.name!r}: its verifiers rubric gave {reward!r}, not a reward in [0, 1]")
        return float(reward)


def _toolsets(taskset: Any, task: Any) -> list[Any]:
    """The taskset's shared toolsets and its tasks' (one task stands for all: `Task.toolsets` is a classmethod)."""
    return [*type(taskset).toolsets(taskset.config), *task.toolsets(task.config)]


def _prompt_text(data: Any, where: str) -> str:
    """The task's prompt as mopd's prompt text: its system prompt (if any) and its user prompt, one line apart."""
    prompt = data.prompt
    if isinstance(prompt, list):  # messages: their text contents in order
        texts = [getattr(m, "content", None) if not isinstance(m, dict) else m.get("content") for m in prompt]
        if not all(isinstance(t, str) for t in texts):
            raise DomainError(f"{where}: only text prompts can be played (a message has non-text content)")
        prompt = "\n".join(texts)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DomainError(f"{where}: the task has no text prompt")
    system = getattr(data, "system_prompt", None)
    return f"{system}\n{prompt}" if isinstance(system, str) and system.strip() else prompt


def _completion(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat.completion around one assistant message, what verifiers' chat dialect parses."""
    return {"id": "mopd", "object": "chat.completion", "created": 0, "model": "mopd-policy",
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


async def _score(vf: Any, task: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> float:
    from verifiers.v1 import graph
    from verifiers.v1.dialects import ChatDialect
    from verifiers.v1.trace import TraceTask

    chat = ChatDialect()
    trace = vf.Trace(task=TraceTask(type=type(task).__name__, data=task.data, key=task.key, hash=task.hash),
                     agent=vf.AgentInfo(config=vf.AgentConfig(model="mopd-policy")))
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            request = chat.parse_request({"messages": messages[:i], **({"tools": tools} if tools else {})})
            response = chat.parse_response(chat.validate_response(_completion(m)))
            graph.prepare_turn(trace, request.messages, request.tools).commit(response)
    trace.ok = trace.is_completed = True
    await task.score(trace)
    return trace.reward


@dataclass
class VerifiersToolDomain(VerifiersDomain):
    """A verifiers taskset with tools: a tool-use domain whose episodes mopd's multi-turn sampler plays."""

    limits: Limits = field(default_factory=Limits)
    # a perfect agent's model turns for a task's data (`name:a,b` calls, then the answer), or a table of them by
    # prompt (a recipe's demonstration file): gold trajectories for SFT, played through the tools as
    # `ToolDomain.trajectory` does; without it SFT trains on `answer` alone
    demonstration: Callable[[Any], list[str]] | Mapping[str, list[str]] | None = None
    tools: dict[str, Tool] = field(default_factory=dict)
    schemas: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool schemas, for the trace

    def __post_init__(self) -> None:
        super().__post_init__()
        self._loop: _Loop | None = None
        self._servers: dict[str, tuple[Any, str]] = {}
        self.tools, self.schemas = self._discover()
        if self.demonstration is not None:
            self._parts = tuple([self._with_trajectory(p) for p in part] for part in self._parts)

    def _with_trajectory(self, problem: Problem) -> Problem:
        episode, segments = self.start(problem), []
        if isinstance(self.demonstration, Mapping):
            if problem.prompt not in self.demonstration:
                raise DomainError(f"domain {self.name!r}: the demonstration has no turns for the task whose prompt "
                                  f"is {problem.prompt!r} (every task needs one)")
            turns = self.demonstration[problem.prompt]
        else:
            turns = self.demonstration(self.task(problem).data)
        for turn in turns:
            segments.append(("model", turn))
            reply = episode.step(turn)
            if reply.observation is None:
                break
            segments.append(("env", reply.observation))
        return replace(problem, meta={"trajectory": segments, "tools": self.tools})

    def _discover(self) -> tuple[dict[str, Tool], list[dict[str, Any]]]:
        """The taskset's tools, served in-process (one MCP server object per toolset, no HTTP), as mopd tools."""
        import logging

        from mcp.server.mcpserver import MCPServer

        if self._loop is None:
            self._loop = _Loop()
        level = logging.getLogger().level
        tools: dict[str, Tool] = {}
        schemas: list[dict[str, Any]] = []
        for ts in _toolsets(self.taskset, self.tasks[0]):
            server = MCPServer(ts.server_name or type(ts).__name__)
            logging.getLogger().setLevel(level)  # MCPServer() sets the root logger to INFO
            ts.register(server)
            self._loop.run(ts.setup())
            for t in self._loop.run(server.list_tools()):
                full = f"{ts.server_name}_{t.name}" if ts.server_name else t.name  # verifiers' harness naming
                self._servers[full] = (server, t.name)
                tools[full] = _mopd_tool(full, t.input_schema or {}, t.description or "",
                                         lambda args, full=full: self._call(full, args))
                schemas.append({"type": "function", "function": {"name": full, "description": t.description or "",
                                                                 "parameters": t.input_schema}})
        return tools, schemas

    def _call(self, name: str, args: dict[str, Any]) -> str:
        if not self._servers:
            self._discover()
        server, raw = self._servers[name]
        # run_tool's own limit reports the timeout first; this one frees the loop of an async tool that overran
        result = self._loop.run(server.call_tool(raw, args), timeout=self.limits.tool_time_s + 1.0)
        if getattr(result, "is_error", False) or getattr(result, "isError", False):
            raise RuntimeError(_text(result))
        return _text(result)

    def start(self, problem: Problem, *, chat: bool = False) -> VerifiersEpisode:
        return VerifiersEpisode(self, problem, chat)

    def __getstate__(self) -> dict[str, Any]:  # a Ray worker rebuilds the tools' event loop on first use
        return {k: v for k, v in self.__dict__.items() if k not in ("_loop", "_servers")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _loop=None, _servers={})


@dataclass
class VerifiersEpisode:
    """One episode: tool calls (mopd's format) get the toolset's results; the first other turn ends it, and the
    task's rubric scores the whole conversation."""

    domain: VerifiersToolDomain
    problem: Problem
    chat: bool = False
    stats: EpisodeStats = field(default_factory=EpisodeStats)
    messages: list[dict[str, Any]] = field(default_factory=list)  # mopd's chat rendering (text turns)
    wire: list[dict[str, Any]] = field(default_factory=list)  # the same as OpenAI messages, for the trace

    def __post_init__(self) -> None:
        self.messages.append({"role": "user", "content": self.problem.prompt})
        self.wire.append({"role": "user", "content": self.problem.prompt})

    def step(self, turn: str) -> Reply:
        self.stats.turns += 1
        self.messages.append({"role": "assistant", "content": turn})
        limits = self.domain.limits
        calls = parse_calls(turn, self.domain.tools, chat=self.chat, max_calls=limits.max_parallel_calls)
        if calls is None:
            self.wire.append({"role": "assistant", "content": turn})
            return Reply(None, reward=self.domain.score(self.problem, self.wire, self.domain.schemas))
        self.stats.tool_calls += len(calls)
        self.stats.malformed_calls += sum(isinstance(c, CallError) for c in calls)
        if self.stats.turns >= limits.max_turns:
            return Reply(None, reward=0.0)  # the last allowed turn was not an answer
        ids = {i: f"call_{self.stats.turns}_{i}" if i else f"call_{self.stats.turns}" for i in range(len(calls))}
        valid = [(i, c) for i, c in enumerate(calls) if isinstance(c, ToolCall)]
        self.wire.append({"role": "assistant", "content": turn} if not valid else {
            "role": "assistant", "content": None, "tool_calls": [{
                "id": ids[i], "type": "function",
                "function": {"name": c.tool.name, "arguments": json.dumps(c.args)}} for i, c in valid]})
        results = start_calls(calls, None, time_limit_s=limits.tool_time_s, max_chars=limits.max_observation_chars,
                              processes=limits.tool_processes).results()
        for i, (call, result) in enumerate(zip(calls, results, strict=True)):
            self.stats.tool_errors += int(result.error)
            self.stats.truncated_observations += int(result.truncated)
            self.messages.append({"role": "tool", "content": result.text})
            if isinstance(call, ToolCall):
                self.wire.append({"role": "tool", "tool_call_id": ids[i], "name": call.tool.name,
                                  "content": result.text})
        return Reply(" ".join(r.text for r in results))

    def cut(self, partial: str) -> float:
        self.stats.cut = True
        return 0.0


def verifiers_domain(name: str, taskset: Any, *, eval_size: int | None = None, seed: int = HELD_OUT_SEED,
                     answer_field: str = "answer", limits: Limits | None = None,
                     demonstration: Callable[[Any], list[str]] | Mapping[str, list[str]] | None = None,
                     description: str = "") -> VerifiersDomain:
    """The taskset as a domain: a tool-use domain if it (or its tasks) has toolsets, else a single-turn one.
    `eval_size` tasks are held out (default: a quarter, at most 96), chosen once from (name, seed); `answer_field`
    names the task data's reference answer (what SFT trains on); `limits` and `demonstration` are a tool-use
    domain's (`envs.episode.Limits`; a perfect agent's turns for a task's data, for SFT on trajectories)."""
    _vf()
    tasks = list(taskset)
    if not tasks:
        raise DomainError(f"domain {name!r}: the verifiers taskset has no task")
    kwargs = dict(name=name, taskset=taskset, tasks=tasks, eval_size=eval_size, seed=seed, answer_field=answer_field,
                  description=description)
    if _toolsets(taskset, tasks[0]):
        return VerifiersToolDomain(**kwargs, limits=limits or Limits(), demonstration=demonstration)
    return VerifiersDomain(**kwargs)


def load_taskset(taskset_id: str, settings: Mapping[str, Any] | None = None) -> Any:
    """A taskset by its id, as verifiers loads one (an installed package exporting its Taskset subclass via
    `__all__`), with `settings` as its config's fields."""
    _vf()
    from verifiers.v1.utils.loaders import load_taskset as vf_load_taskset
    from verifiers.v1.utils.loaders import taskset_config_type

    config = taskset_config_type(taskset_id).model_validate({**dict(settings or {}), "id": taskset_id})
    return vf_load_taskset(config)


def register_verifiers_domain(name: str, taskset: Any, **kwargs: Any) -> VerifiersDomain:
    """`verifiers_domain(...)`, registered under `name` (for a plugin file); a taken name is a ValueError."""
    if name in _REGISTRY:
        existing = _REGISTRY[name]
        if isinstance(existing, VerifiersDomain) and type(existing.taskset) is type(taskset):
            return existing  # the plugin imported twice
        raise ValueError(f"domain {name!r} is already registered; pick another name")
    domain = verifiers_domain(name, taskset, **kwargs)
    _REGISTRY[name] = domain  # type: ignore[assignment]
    return domain
