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
gold trajectories with the same two functions, so training and sampling see the same ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..core.batch import ROLE_ENV, ROLE_MODEL, ROLE_PROMPT
from ..models.prompting import PromptFormat
from .base import Problem
from .tools import CallError, Tool, parse_char_call, parse_chat_call, run_tool, tool_schema

OBSERVATION_END = "="  # raw format: what follows an observation, so the model knows its turn starts


@dataclass(frozen=True)
class Limits:
    max_turns: int = 4  # model turns per episode
    max_tokens: int = 48  # completion-window tokens per episode (model and observation tokens)
    tool_time_s: float = 1.0  # a tool call running longer is an error observation
    max_observation_chars: int = 16  # longer tool results are truncated to this


@dataclass
class EpisodeStats:
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0  # malformed calls, unknown tools, raised or timed-out tools
    truncated_observations: int = 0
    cut: bool = False  # ended by the token budget
    tokens: int = 0  # completion-window tokens (model and observation), set by the sampler


@dataclass(frozen=True)
class Reply:
    observation: str | None  # None: the episode ended
    reward: float = 0.0  # the episode's reward when it ended, else 0


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


@dataclass
class ToolEpisode:
    """One episode of a tool-use task: tool calls get observations, the first other turn is the final answer,
    rewarded by `verify(problem, answer)`."""

    problem: Problem
    tools: Mapping[str, Tool]
    verify: Callable[[Problem, str], float]
    limits: Limits
    chat: bool = False
    stats: EpisodeStats = field(default_factory=EpisodeStats)
    messages: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.messages.append({"role": "user", "content": self.problem.prompt})

    def step(self, turn: str) -> Reply:
        self.stats.turns += 1
        self.messages.append({"role": "assistant", "content": turn})
        call = (parse_chat_call if self.chat else parse_char_call)(turn, dict(self.tools))
        if call is None:
            return Reply(None, reward=float(self.verify(self.problem, turn)))
        self.stats.tool_calls += 1
        if self.stats.turns >= self.limits.max_turns:
            return Reply(None, reward=0.0)  # the last allowed turn was not an answer
        if isinstance(call, CallError):
            self.stats.tool_errors += 1
            text = call.message
        else:
            result = run_tool(call, time_limit_s=self.limits.tool_time_s,
                              max_chars=self.limits.max_observation_chars)
            self.stats.tool_errors += int(result.error)
            self.stats.truncated_observations += int(result.truncated)
            text = result.text
        self.messages.append({"role": "tool", "content": text})
        return Reply(text)

    def cut(self, partial: str) -> float:
        self.stats.cut = True
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
    """The ids appended after the model's turn (which ended with EOS) for the last message, a tool result.

    Chat: the template's rendering of the messages with the tool result and a generation prompt, from just after
    the assistant turn's end-of-turn token (the last EOS of the rendering without the tool message) on.
    """
    text = messages[-1]["content"]
    if not fmt.chat_template:
        return list(tokenizer(text + OBSERVATION_END, add_special_tokens=False).input_ids)
    before = _template(tokenizer, messages[:-1], fmt, tools, False)
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
    as the multi-turn sampler renders it: each model turn's tokens and EOS, each observation's `observation_ids`.
    """
    ids = prompt_ids(tokenizer, fmt, prompt, tools)
    roles = [ROLE_PROMPT] * len(ids)
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    for kind, text in segments:
        if kind == "model":
            new = [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
            messages.append({"role": "assistant", "content": text})
            role = ROLE_MODEL
        else:
            messages.append({"role": "tool", "content": text})
            new, role = observation_ids(tokenizer, fmt, messages, tools), ROLE_ENV
        ids += new
        roles += [role] * len(new)
    return ids, roles
