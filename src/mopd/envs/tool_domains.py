"""Built-in tool-use domains a ~0.4M-parameter character model can learn, each one needing its tool:

    tool_mul     mul:123*45=     a calculator `mul(a, b)`; 2x2, 3x2 or 3x3-digit factors (too long to multiply
                                 in the head of a tiny model, a copy with the tool)
    tool_lookup  lookup:qwk=     a key-value store read only through `get(key)`: values are a hash of the key,
                                 so no model can compute or memorise them (3, 4 or 5-letter keys)
    tool_chain   chain:qwk*7=    two tools: `get` the key's value, then `mul` it by the number (1 or 2 digits)

A gold trajectory (`ToolDomain.trajectory`) is the model turns a perfect agent writes with the observations its
tools return, so an SFT stage teaches the call format; the reward is the partial-match reward of the final
answer (the first turn that is not a tool call). A `ToolDomain` is a `Domain` (the registry's held-out sets,
training draws and verifier) that also starts episodes (`envs.episode.Environment`).

Plugins add one with `register_tool_domain` (docs/AGENTS.md, "Writing a tool domain"): its tools, a
demonstration, and optionally `setup(problem) -> state` and `teardown(state)` around each episode (tools that
declare a `ToolContext` parameter see the problem and that state) and a user simulator.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .base import (
    Domain,
    DomainError,
    Generator,
    Problem,
    Verifier,
    add_domain,
    check_difficulties,
    guarded_verifier,
    partial_match_reward,
)
from .episode import Limits, ToolEpisode, UserSimulator
from .tools import Tool, tool


def mul(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def get(key: str) -> int:
    """Read the value stored under a key."""
    digest = hashlib.sha256(f"mopd-kv:{key}".encode()).digest()
    return 100 + int.from_bytes(digest[:4], "little") % 900


MUL, GET = tool(mul), tool(get)


@dataclass(frozen=True)
class ToolDomain(Domain):
    """A generated domain whose problems are played as tool-use episodes."""

    tools: Mapping[str, Tool] = field(default_factory=dict, hash=False)
    limits: Limits = Limits()
    demonstration: Callable[[Problem], list[str]] | None = None  # a perfect agent's model turns
    setup: Callable[[Problem], Any] | None = None  # an episode's state, made when it starts
    teardown: Callable[[Any], None] | None = None  # run on that state once the episode ends
    user: UserSimulator | None = None  # answers a turn that is not a call (None: it is the final answer)

    def _make(self, rng: random.Random, difficulty: int) -> Problem:
        """A problem that carries its gold trajectory and tools (`meta`), what SFT on trajectories trains on."""
        problem = super()._make(rng, difficulty)
        return replace(problem, meta={"trajectory": self.trajectory(problem), "tools": self.tools})

    def start(self, problem: Problem, *, chat: bool = False) -> ToolEpisode:
        state = None
        if self.setup is not None:
            try:
                state = self.setup(problem)
            except (Exception, SystemExit) as e:  # plugin code: one line naming the domain
                raise DomainError(f"domain {self.name!r}: its setup raised {e.__class__.__name__}: {e}") from None
        return ToolEpisode(problem, self.tools, self.verify, self.limits, chat=chat, state=state,
                           teardown=self.teardown, user=self.user)

    def trajectory(self, problem: Problem) -> list[tuple[str, str]]:
        """The gold trajectory: ("model", turn) segments, each followed by what answered it ("env": a tool
        result, one per call; "user": a user simulator's message), from playing the demonstration through an
        episode (so the observations are what the tools return)."""
        if self.demonstration is None:
            raise DomainError(f"domain {self.name!r}: a tool domain needs a demonstration (its gold turns)")
        try:
            turns = list(self.demonstration(problem))
        except (Exception, SystemExit) as e:
            raise DomainError(f"domain {self.name!r}: its demonstration raised {e.__class__.__name__}: "
                              f"{e}") from None
        episode = self.start(problem)
        # the domain's own perfect agent: its calls run on threads even where the policy's run in processes
        # (a fork per call per training problem would cost SFT minutes)
        episode.limits = replace(self.limits, tool_processes=False)
        segments: list[tuple[str, str]] = []
        for turn in turns:
            segments.append(("model", turn))
            seen = len(episode.messages)
            if episode.step(turn).observation is None:
                break
            segments += [("user" if m["role"] == "user" else "env", m["content"]) for m in episode.messages[seen + 1:]]
        else:
            episode.cut("")  # a demonstration that never answers still ends its episode (teardown)
        return segments


def _digits(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1), 10**n - 1)


def _key(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def _gen_mul(rng: random.Random, difficulty: int) -> tuple[str, str]:
    a, b = {1: (2, 2), 2: (3, 2), 3: (3, 3)}[difficulty]
    x, y = _digits(rng, a), _digits(rng, b)
    return f"mul:{x}*{y}=", str(x * y)


def _demo_mul(problem: Problem) -> list[str]:
    x, y = problem.prompt[len("mul:") : -1].split("*")
    return [f"mul:{x},{y}", str(int(x) * int(y))]


def _gen_lookup(rng: random.Random, difficulty: int) -> tuple[str, str]:
    key = _key(rng, difficulty + 2)
    return f"lookup:{key}=", str(get(key))


def _demo_lookup(problem: Problem) -> list[str]:
    key = problem.prompt[len("lookup:") : -1]
    return [f"get:{key}", str(get(key))]


def _gen_chain(rng: random.Random, difficulty: int) -> tuple[str, str]:
    key = _key(rng, 3)
    n = rng.randint(2, 9) if difficulty == 1 else _digits(rng, 2)
    return f"chain:{key}*{n}=", str(get(key) * n)


def _demo_chain(problem: Problem) -> list[str]:
    key, n = problem.prompt[len("chain:") : -1].split("*")
    value = get(key)
    return [f"get:{key}", f"mul:{value},{n}", str(value * int(n))]


def register_tool_domain(
    name: str,
    *,
    tools: Sequence[Tool | Callable[..., Any]],
    demonstration: Callable[[Problem], list[str]],
    difficulties: tuple[int, ...] = (1, 2, 3),
    verify: Verifier | None = None,
    description: str = "",
    limits: Limits = Limits(),
    setup: Callable[[Problem], Any] | None = None,
    teardown: Callable[[Any], None] | None = None,
    user: UserSimulator | None = None,
) -> Callable[[Generator], Generator]:
    """Decorator registering `fn(rng, difficulty) -> (prompt, answer)` as tool domain `name`; returns `fn`.

    `tools`: functions (made `Tool`s with `tool`) or `Tool`s; `demonstration(problem)`: a perfect agent's model
    turns, played through an episode for SFT's gold trajectories; `verify` the final answer's reward (default
    `partial_match_reward`); `limits` the episode's (`envs.episode.Limits`); `setup(problem) -> state` and
    `teardown(state)` run around each episode, and tools with a `ToolContext` parameter see that state; `user`
    is a user simulator. Registering the same generator again is a no-op; another one under a taken name is a
    ValueError, as for `register_domain`.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"domain name must be a non-empty string, got {name!r}")
    diffs = check_difficulties(difficulties)
    made = [t if isinstance(t, Tool) else tool(t) for t in tools]
    if not made or len({t.name for t in made}) != len(made):
        raise ValueError(f"tool domain {name!r}: tools must be a non-empty list with distinct names")
    if not callable(demonstration):
        raise TypeError(f"tool domain {name!r}: demonstration must be a function of the problem")

    def decorator(fn: Generator) -> Generator:
        add_domain(fn, lambda: ToolDomain(
            name=name, generate=fn, verify=guarded_verifier(name, verify or partial_match_reward),
            difficulties=diffs, description=description, tools={t.name: t for t in made}, limits=limits,
            demonstration=demonstration, setup=setup, teardown=teardown, user=user,
        ), name)
        return fn

    return decorator


def _register(name: str, generate, demonstration, tools: list[Tool], difficulties: tuple[int, ...],
              description: str) -> None:
    register_tool_domain(name, tools=tools, demonstration=demonstration, difficulties=difficulties,
                         description=description)(generate)


_register("tool_mul", _gen_mul, _demo_mul, [MUL], (1, 2, 3),
          "mul:a*b= with 2x2, 3x2 or 3x3-digit factors, and a calculator tool `mul:a,b`")
_register("tool_lookup", _gen_lookup, _demo_lookup, [GET], (1, 2, 3),
          "lookup:KEY= -> the value stored under a 3, 4 or 5-letter key, readable only with the tool `get:KEY`")
_register("tool_chain", _gen_chain, _demo_chain, [GET, MUL], (1, 2),
          "chain:KEY*n= -> the value under KEY times n (1 or 2 digits): `get:KEY`, then `mul:VALUE,n`")


def is_agentic(domain: object) -> bool:
    """Whether a domain plays episodes (has `start`) rather than answering in one turn."""
    return callable(getattr(domain, "start", None))
