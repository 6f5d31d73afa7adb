"""The episode protocol: an environment starts an episode from a problem, answers each model turn with an
observation (a tool result, an error, a game state) or ends the episode with a reward.

    episode = environment.start(problem, chat=False)
    reply = episode.step(turn_text)       # Reply(observation="5535", reward=0.0) or Reply(None, reward=r)
    reward = episode.cut(partial_turn)    # the token budget ran out first (a tool episode's reward is then 0)

A model turn ends at the tokenizer's EOS (for chat models the end-of-turn token). The sampler
(`sampling.multi_turn`) owns the token budget (`Limits.max_tokens`, observations included); the episode owns the
turn limit (`Limits.max_turns`: a tool call on the last allowed turn ends the episode with reward 0) and counts
what the per-episode metrics report (`EpisodeStats`).

How an observation becomes token ids (`observation_ids`): raw prompts (the tiny character models) append
`observation + "="`, the same cue a prompt ends with; chat prompts append what the chat template renders for a
`tool` message after the assistant's turn, up to the next assistant generation prompt. SFT on trajectories renders
gold trajectories with the same two functions, so training and sampling see the same ids. Several results of
one turn are one observation: raw prompts join them one space apart, chat prompts render one `tool` message each.

`submit(turn)` starts a turn's tool calls and returns at once; `.reply()` waits for them. The sampler starts the
calls of every row that ended a turn, runs the batch's next forward, then waits (`envs.tool_runner`); `step` is
`submit(...).reply()`. An episode whose turn is not a call may hand it to a user simulator (`ToolEpisode.user`),
whose message is the next observation, rendered as a `user` message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..core.batch import ROLE_ENV, ROLE_MODEL, ROLE_PROMPT
from ..models.prompting import PromptFormat
from .base import DomainError, Problem
from .tool_runner import start_calls
from .tools import CallError, Tool, ToolContext, ToolReply, parse_calls, tool_schema

OBSERVATION_END = "="  # raw format: what follows an observation, so the model knows its turn starts


@dataclass(frozen=True)
class Limits:
    max_turns: int = 4  # model turns per episode
    max_tokens: int = 48  # completion-window tokens per episode (model and observation tokens)
    tool_time_s: float = 1.0  # a tool call running longer is an error observation
    max_observation_chars: int = 16  # longer tool results are truncated to this (each result of a turn)
    max_parallel_calls: int = 4  # calls one turn may make; each one past it is an error observation
    tool_processes: bool = False  # run each call in a forked worker process, killed at its time limit
    overlap_tools: bool = False  # the batch keeps decoding while this domain's tools run (sampling.multi_turn)

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens", "tool_time_s", "max_observation_chars", "max_parallel_calls"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive number, got {value!r}")


@dataclass
class EpisodeStats:
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0  # malformed calls, unknown tools, raised or timed-out tools
    malformed_calls: int = 0  # calls that could not run: not JSON, unknown tool, bad arguments, over the limit
    truncated_observations: int = 0
    user_turns: int = 0  # turns a user simulator answered
    turn_rewards: list[float] = field(default_factory=list)  # per-turn rewards (tools' `ToolReply`, the user's)
    cut: bool = False  # ended by the token budget
    tokens: int = 0  # completion-window tokens (model and observation), set by the sampler


@dataclass(frozen=True)
class Reply:
    observation: str | None  # None: the episode ended
    reward: float = 0.0  # the episode's reward when it ended, else 0


class PendingReply:
    """A turn's reply that may still be waiting on its tools: `reply()` waits, then applies the results."""

    def __init__(self, finish: Callable[[], Reply], ready: Callable[[], bool] | None = None,
                 immediate: bool = False) -> None:
        self._finish, self._ready, self._reply = finish, ready, None
        self.immediate = immediate  # nothing to wait for (no tool ran)

    @staticmethod
    def now(reply: Reply) -> PendingReply:
        return PendingReply(lambda: reply, immediate=True)

    def ready(self) -> bool:
        """Whether `reply()` would return without waiting (every call finished or past its time limit)."""
        return self.immediate or self._reply is not None or self._ready is None or self._ready()

    def reply(self) -> Reply:
        if self._reply is None:
            self._reply = self._finish()
        return self._reply


def submit_turn(episode: Episode, turn: str) -> PendingReply:
    """`episode.submit(turn)` where the episode can start its tools and return; else its `step`, run now."""
    submit = getattr(episode, "submit", None)
    return submit(turn) if callable(submit) else PendingReply.now(episode.step(turn))


class Episode(Protocol):
    stats: EpisodeStats
    messages: list[dict[str, Any]]  # the chat so far (user, assistant, tool), for chat rendering

    def step(self, turn: str) -> Reply: ...

    def cut(self, partial: str) -> float: ...


class Environment(Protocol):
    """What an agentic domain has beside `DomainLike`: the episode it starts for a problem, and its tools."""

    limits: Limits
    tools: Mapping[str, Tool]

    def start(self, problem: Problem, *, chat: bool = False) -> Episode: ...


UserSimulator = Callable[[ToolContext, str], "str | ToolReply | None"]


@dataclass
class ToolEpisode:
    """One episode of a tool-use task: tool calls get observations, the first other turn is the final answer,
    rewarded by `verify(problem, answer)` plus the per-turn rewards (the sum clipped to [0, 1], the range every
    reward downstream assumes). `state` is what the domain's `setup(problem)` returned; `teardown(state)` runs
    once when the episode ends. `user`, when set, answers a turn that is not a call (a user simulator): its text
    is the next observation; None lets the turn stand as the final answer."""

    problem: Problem
    tools: Mapping[str, Tool]
    verify: Callable[[Problem, str], float]
    limits: Limits
    chat: bool = False
    state: Any = None
    teardown: Callable[[Any], None] | None = None
    user: UserSimulator | None = None
    stats: EpisodeStats = field(default_factory=EpisodeStats)
    messages: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.messages.append({"role": "user", "content": self.problem.prompt})
        self.context = ToolContext(self.problem, self.state)
        self._ended = False

    def step(self, turn: str) -> Reply:
        return self.submit(turn).reply()

    def submit(self, turn: str) -> PendingReply:
        """Take a model turn: start its tool calls (all at once) and return; `.reply()` waits for them."""
        self.stats.turns += 1
        self.messages.append({"role": "assistant", "content": turn})
        calls = parse_calls(turn, dict(self.tools), chat=self.chat, max_calls=self.limits.max_parallel_calls)
        if calls is None:
            said = self._user(turn) if self.user is not None and self.stats.turns < self.limits.max_turns else None
            if said is not None:
                return PendingReply.now(said)
            return PendingReply.now(self._end(float(self.verify(self.problem, turn)) + sum(self.stats.turn_rewards)))
        self.stats.tool_calls += len(calls)
        self.stats.malformed_calls += sum(isinstance(c, CallError) for c in calls)
        if self.stats.turns >= self.limits.max_turns:
            return PendingReply.now(self._end(0.0))  # the last allowed turn was not an answer
        pending = start_calls(calls, self.context, time_limit_s=self.limits.tool_time_s,
                              max_chars=self.limits.max_observation_chars, processes=self.limits.tool_processes)

        def finish() -> Reply:
            texts, reward = [], 0.0
            for result in pending.results():  # in call order, whatever order they finished in
                self.stats.tool_errors += int(result.error)
                self.stats.truncated_observations += int(result.truncated)
                reward += result.reward
                texts.append(result.text)
                self.messages.append({"role": "tool", "content": result.text})
            self.stats.turn_rewards.append(reward)
            return Reply(" ".join(texts))

        return PendingReply(finish, pending.done)

    def _user(self, turn: str) -> Reply | None:
        assert self.user is not None
        try:
            said = self.user(self.context, turn)
        except (Exception, SystemExit) as e:  # plugin code: one line naming the domain
            raise DomainError(f"domain {self.problem.domain!r}: its user simulator raised "
                              f"{e.__class__.__name__}: {e}") from None
        if said is None:
            return None
        reward = said.reward if isinstance(said, ToolReply) else 0.0
        text = str(said.text if isinstance(said, ToolReply) else said)
        self.stats.user_turns += 1
        self.stats.turn_rewards.append(float(reward))
        self.messages.append({"role": "user", "content": text})
        return Reply(text)

    def _end(self, reward: float) -> Reply:
        self._close()
        return Reply(None, reward=min(1.0, max(0.0, reward)))

    def _close(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self.teardown is not None:
            try:
                self.teardown(self.state)
            except (Exception, SystemExit) as e:
                raise DomainError(f"domain {self.problem.domain!r}: its teardown raised "
                                  f"{e.__class__.__name__}: {e}") from None

    def cut(self, partial: str) -> float:
        self.stats.cut = True
        self._close()
        return 0.0


@dataclass
class SingleTurnEpisode:
    """A single-turn domain's problem as an episode (so it can share a batch with agentic rows): the first turn
    is the answer, without its EOS, as the single-turn sampler's completion text."""

    problem: Problem
    verify: Callable[[Problem, str], float]
    stats: EpisodeStats = field(default_factory=EpisodeStats)
    messages: list[dict[str, Any]] = field(default_factory=list)

    def step(self, turn: str) -> Reply:
        self.stats.turns += 1
        return Reply(None, reward=float(self.verify(self.problem, turn)))

    def cut(self, partial: str) -> float:
        """A single-turn answer cut by the budget is verified as it stands, as the single-turn sampler does."""
        self.stats.cut = True
        return float(self.verify(self.problem, partial))


def _template(tokenizer, messages: list[dict[str, Any]], fmt: PromptFormat, tools: Mapping[str, Tool] | None,
              generation_prompt: bool) -> list[int]:
    schemas = [tool_schema(t) for t in tools.values()] if tools else None
    ids = tokenizer.apply_chat_template(messages, tools=schemas, add_generation_prompt=generation_prompt,
                                        tokenize=True, **fmt.template_kwargs)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def prompt_ids(tokenizer, fmt: PromptFormat, prompt: str, tools: Mapping[str, Tool] | None) -> list[int]:
    """The ids an episode starts from: the stage's rendering, with the tools' schemas for a chat template."""
    if not fmt.chat_template:
        return fmt.token_ids(tokenizer, prompt)
    return _template(tokenizer, [{"role": "user", "content": prompt}], fmt, tools, True)


def observation_ids(tokenizer, fmt: PromptFormat, messages: list[dict[str, Any]],
                    tools: Mapping[str, Tool] | None) -> list[int]:
    """The ids appended after the model's turn (which ended with EOS) for the messages after it: its tool
    results (one or several) or a user simulator's message.

    Raw: the texts one space apart, then `=`. Chat: the template's rendering of the messages with those messages
    and a generation prompt, from just after the assistant turn's end-of-turn token (the last EOS of the
    rendering up to the assistant turn) on.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if not fmt.chat_template:
        text = " ".join(str(m["content"]) for m in messages[last + 1 :])
        return list(tokenizer(text + OBSERVATION_END, add_special_tokens=False).input_ids)
    before = _template(tokenizer, messages[: last + 1], fmt, tools, False)
    full = _template(tokenizer, messages, fmt, tools, True)
    eos = tokenizer.eos_token_id
    ends = [i for i, t in enumerate(before) if t == eos]
    if not ends or full[: ends[-1] + 1] != before[: ends[-1] + 1]:
        raise ValueError("the chat template does not render the tool message after the assistant's end-of-turn "
                         "token; this template cannot be used for multi-turn episodes")
    return full[ends[-1] + 1 :]


def trajectory_ids(tokenizer, fmt: PromptFormat, prompt: str, segments: list[tuple[str, str]],
                   tools: Mapping[str, Tool] | None) -> tuple[list[int], list[int]]:
    """A trajectory's ids and who wrote each (`core.batch.ROLE_*`), rendered
    as the multi-turn sampler renders it: each model turn's tokens and EOS, then the segments after it ("env": a
    tool result, "user": a user simulator's message) as one observation, `observation_ids`.
    """
    ids = prompt_ids(tokenizer, fmt, prompt, tools)
    roles = [ROLE_PROMPT] * len(ids)
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    for i, (kind, text) in enumerate(segments):
        if kind == "model":
            new = [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
            messages.append({"role": "assistant", "content": text})
            role = ROLE_MODEL
        else:
            messages.append({"role": "user" if kind == "user" else "tool", "content": text})
            if i + 1 < len(segments) and segments[i + 1][0] != "model":
                continue  # one observation for every segment up to the next model turn
            new, role = observation_ids(tokenizer, fmt, messages, tools), ROLE_ENV
        ids += new
        roles += [role] * len(new)
    return ids, roles
