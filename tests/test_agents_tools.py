"""Issue 38, items 1 and 2: the public tool-domain API (register_tool_domain, tools that see their episode's
problem and state, setup and teardown, per-turn rewards, a user simulator), and tools that run as the field runs
them (parallel calls of one turn, run concurrently under `max_parallel_calls`; worker processes killed at their
time limit; the code sandbox as a tool; every malformed call an observation and a count), with replies applied
in a fixed order whatever the tools' timing."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field, replace

import pytest
import torch

import mopd.envs as envs
from mopd.envs import Limits, Problem, ToolContext, ToolReply, python_tool, register_tool_domain, tool
from mopd.envs import base as envs_base
from mopd.envs.episode import EpisodeStats, PendingReply, Reply, ToolEpisode, observation_ids, trajectory_ids
from mopd.envs.tool_domains import GET, MUL
from mopd.envs.tool_runner import start_calls
from mopd.envs.tools import CallError, ToolCall, parse_calls
from mopd.models.prompting import RAW, PromptFormat
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling.multi_turn import EpisodeRow, episode_metrics, episode_rows, sample_episodes

from .test_agents_episode import CHATML
from .test_agents_sampling import PROMPTS, _model, one_thread  # noqa: F401  (one_thread: a fixture used here)

TOOLS = {"mul": MUL, "get": GET}


@pytest.fixture
def registry(monkeypatch):
    """Registrations made by a test stay in it."""
    monkeypatch.setattr(envs_base, "_REGISTRY", dict(envs_base._REGISTRY))


def test_a_plugin_needs_only_the_public_names() -> None:
    for name in ("register_tool_domain", "register_verifiers_domain", "register_domain", "tool", "Tool",
                 "ToolContext", "ToolReply", "ToolDomain", "Limits", "guarded_verifier", "python_tool"):
        assert name in envs.__all__ and hasattr(envs, name), name


def test_parallel_calls_parse_in_both_formats_and_past_the_limit_are_errors() -> None:
    calls = parse_calls("get:qwk mul:2,3", TOOLS, chat=False, max_calls=4)
    assert [c.tool.name for c in calls] == ["get", "mul"] and calls[1].args == {"a": 2, "b": 3}
    assert len(parse_calls("mul:12, 3", TOOLS, chat=False, max_calls=4)) == 1  # a space inside one call's args
    assert parse_calls("408", TOOLS, chat=False, max_calls=4) is None
    over = parse_calls("get:a get:b get:c", TOOLS, chat=False, max_calls=2)
    assert isinstance(over[1], ToolCall) and over[2] == CallError("err:at most 2 calls a turn")
    chat = ('<tool_call>{"name": "mul", "arguments": {"a": 2, "b": 3}}</tool_call> and '
            '<tool_call>{"name": "get", "arguments": {"key": "ab"}}</tool_call><tool_call>nope</tool_call>')
    got = parse_calls(chat, TOOLS, chat=True, max_calls=4)
    assert [type(c).__name__ for c in got] == ["ToolCall", "ToolCall", "CallError"]


def _sleep_then(seconds: float, text: str) -> str:
    """Sleep, then answer."""
    time.sleep(seconds)
    return text


SLEEP = tool(_sleep_then, name="sleep")


def test_a_turns_calls_run_at_once_and_come_back_in_call_order() -> None:
    # the first call sleeps longest: finishing order is the reverse of call order
    calls = [ToolCall(SLEEP, {"seconds": 0.4 - 0.1 * i, "text": f"r{i}"}) for i in range(4)]
    start = time.perf_counter()
    results = start_calls(calls, None, time_limit_s=2.0, max_chars=8).results()
    elapsed = time.perf_counter() - start
    assert [r.text for r in results] == ["r0", "r1", "r2", "r3"]
    assert elapsed < 0.4 + 0.1 + 0.2 + 0.2  # one after another they take 1.0 s; together the longest, 0.4 s


def _hang_and_tell(pid_file: str) -> str:
    """Write this process's id, then hang."""
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
    return "never"


def _crash(a: int) -> int:
    """Exit the process without answering."""
    os._exit(3)


def test_worker_processes_are_killed_at_their_time_limit(tmp_path) -> None:
    pid_file = str(tmp_path / "pid")
    calls = [ToolCall(tool(_hang_and_tell), {"pid_file": pid_file}), ToolCall(MUL, {"a": 6, "b": 7}),
             ToolCall(tool(_crash), {"a": 1})]
    start = time.perf_counter()
    results = start_calls(calls, None, time_limit_s=0.5, max_chars=16, processes=True).results()
    assert time.perf_counter() - start < 5
    assert [r.text for r in results] == ["err:timeout", "42", "err:workerdied"]
    pid = int((tmp_path / "pid").read_text())
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(pid, 0)


def test_the_code_sandbox_is_a_tool() -> None:
    py = python_tool(timeout_s=1.0)
    calls = [ToolCall(py, {"code": "print(sum(range(10)))"}), ToolCall(py, {"code": "print('a')\n1/0"}),
             ToolCall(py, {"code": "while True:\n    pass"})]
    results = start_calls(calls, None, time_limit_s=3.0, max_chars=200).results()
    assert results[0].text == "45" and not results[0].error
    assert results[1].text == "a\nZeroDivisionError: division by zero"
    assert results[2].text == "err:timeout" and results[2].error


# ------------------------------------------------------------------------------- a stateful tool domain


@dataclass
class Vault:
    """An episode's state: a per-problem table, what was read, and whether teardown ran."""

    table: dict[str, int]
    reads: list[str] = field(default_factory=list)
    closed: bool = False


OPENED: list[Vault] = []


def _setup(problem: Problem) -> Vault:
    keys = problem.prompt[len("vault:") : -1].split("+")
    vault = Vault({k: 10 + sum(map(ord, k)) % 80 for k in keys})
    OPENED.append(vault)
    return vault


def _teardown(vault: Vault) -> None:
    assert not vault.closed
    vault.closed = True


def read(ctx: ToolContext, key: str) -> ToolReply:
    """Read a key of this episode's vault."""
    ctx.state.reads.append(key)
    if key not in ctx.state.table:
        return ToolReply("none", reward=-0.1)
    return ToolReply(str(ctx.state.table[key]), reward=0.1)


def _user(ctx: ToolContext, turn: str) -> str | None:
    """Asks once for the sum, then takes the next answer."""
    return "sum" if len(ctx.state.reads) >= 2 and turn == "ready" else None


def _gen(rng: random.Random, difficulty: int) -> tuple[str, str]:
    keys = ["".join(rng.choice("abcdefgh") for _ in range(3)) for _ in range(2)]
    table = _setup(Problem(f"vault:{'+'.join(keys)}=", "0", "vault", difficulty)).table
    return f"vault:{'+'.join(keys)}=", str(sum(table.values()))


def _demo(problem: Problem) -> list[str]:
    keys = problem.prompt[len("vault:") : -1].split("+")
    return [" ".join(f"read:{k}" for k in keys), "ready", problem.answer]


def test_a_stateful_domain_with_per_turn_rewards_and_a_user_turn(registry) -> None:
    register_tool_domain("vault", tools=[read], demonstration=_demo, difficulties=(1,), setup=_setup,
                         teardown=_teardown, user=_user, limits=Limits(max_turns=4))(_gen)
    domain = envs.get_domain("vault")
    assert domain.tools["read"].params == (("key", str),)  # the context is not a model-written argument
    OPENED.clear()
    problem = domain.sample(random.Random(0))
    segments = problem.meta["trajectory"]  # the demonstration played: two reads in one turn, a user turn
    kinds = [k for k, _ in segments]
    assert kinds == ["model", "env", "env", "model", "user", "model"]
    assert OPENED[-1].closed and OPENED[-1].reads == problem.prompt[6:-1].split("+")
    tok = build_char_tokenizer(envs.ALPHABET)
    ids, roles = trajectory_ids(tok, RAW, problem.prompt, segments, domain.tools)
    first, second = (t for k, t in segments if k == "env")
    assert f"<eos>{first} {second}=ready<eos>sum=" in tok.decode(ids)  # one observation for both results

    OPENED.clear()
    episode = domain.start(problem)
    assert episode.step("read:zzz get:a").observation == "none err:unknown tool get"
    assert episode.step("read:" + problem.prompt[6:9]).observation.isdigit()
    assert episode.step("ready").observation == "sum"  # the user simulator's turn
    reply = episode.step(problem.answer)
    assert reply.observation is None and reply.reward == pytest.approx(1.0)  # the answer's 1, then -0.1 and +0.1 per turn
    assert OPENED[-1].closed and episode.stats.malformed_calls == 1 and episode.stats.tool_errors == 1
    assert episode.stats.turn_rewards == pytest.approx([-0.1, 0.1, 0.0]) and episode.stats.user_turns == 1
    wrong = domain.start(problem)
    wrong.step("read:zzz")
    assert wrong.step("0").reward == pytest.approx(0.0)  # a wrong answer's 0 minus 0.1 is clipped to 0
    metrics = episode_metrics([episode.stats, wrong.stats], ["vault", "vault"])
    assert metrics["episode/malformed_calls"] == 0.5 and metrics["episode/user_turns"] == 0.5
    # a domain's Limits.overlap_tools reaches the sampler through its rows
    assert [r.overlap_tools for r in episode_rows([problem], {"vault": domain}, 8)] == [False]
    overlapping = replace(domain, limits=Limits(max_turns=4, overlap_tools=True))
    assert [r.overlap_tools for r in episode_rows([problem], {"vault": overlapping}, 8)] == [True]


def test_a_broken_setup_is_one_line_naming_the_domain(registry) -> None:
    def bad_setup(problem: Problem) -> None:
        raise KeyError("no table")

    register_tool_domain("broken", tools=[read], demonstration=_demo, difficulties=(1,), setup=bad_setup)(_gen)
    with pytest.raises(envs.DomainError, match="domain 'broken': its setup raised KeyError"):
        envs.get_domain("broken").sample(random.Random(0))
    with pytest.raises(ValueError, match="already registered"):
        register_tool_domain("broken", tools=[read], demonstration=_demo)(_demo)


# ------------------------------------------------------------------- the sampler with slow, concurrent tools


@dataclass
class SlowToolEpisode:
    """Every turn but the last calls a tool that sleeps a random time (`jitter`) and answers from the turn; the
    reply is applied when the sampler collects it."""

    row: int
    turns: int
    jitter: random.Random | None
    delay: float = 0.03
    stats: EpisodeStats = field(default_factory=EpisodeStats)
    messages: list = field(default_factory=list)

    def submit(self, turn: str) -> PendingReply:
        self.stats.turns += 1
        if self.stats.turns >= self.turns:
            return PendingReply.now(Reply(None, reward=self.stats.turns / 10))
        delay = self.jitter.uniform(0.0, self.delay) if self.jitter else 0.0
        pending = start_calls([ToolCall(SLEEP, {"seconds": delay, "text": f"{self.row}x{turn[:3]}"})], None,
                              time_limit_s=5.0, max_chars=16)

        def finish() -> Reply:
            self.messages.append({"role": "tool", "content": pending.results()[0].text})
            return Reply(self.messages[-1]["content"])

        return PendingReply(finish, pending.done)

    def step(self, turn: str) -> Reply:
        return self.submit(turn).reply()

    def cut(self, partial: str) -> float:
        self.stats.cut = True
        return 0.0


def _slow_rows(jitter_seed: int | None, delay: float = 0.03) -> list[EpisodeRow]:
    jitter = random.Random(jitter_seed) if jitter_seed is not None else None
    return [EpisodeRow(Problem(p, "1", "slow", 1), SlowToolEpisode(i, 2 + i % 3, jitter, delay), 28)
            for i, p in enumerate(PROMPTS)]


def test_episodes_are_the_same_whatever_the_tools_timing() -> None:
    """Waiting at the next step: bit for bit the same batch with instant tools and with tools of random delays."""
    model, tok = _model("=", scale=10.0)

    def run(jitter_seed: int | None):
        return sample_episodes(model, tok, _slow_rows(jitter_seed), temperature=1.0,
                               generator=torch.Generator().manual_seed(3))

    (a, stats), (b, _), (c, _) = run(None), run(1), run(2)
    for other in (b, c):
        assert torch.equal(a.input_ids_B_T, other.input_ids_B_T) and torch.equal(a.roles_B_T, other.roles_B_T)
        assert torch.equal(a.sampler_logprobs_B_T, other.sampler_logprobs_B_T)
        assert torch.equal(a.rewards_B, other.rewards_B)
    assert sum(s.turns >= 2 for s in stats) >= 3  # tools ran between turns


def test_overlapped_tools_hold_their_row_and_give_the_same_episodes_in_any_timing() -> None:
    """overlap_tools: a row whose tool runs holds while the others decode (the tools here sleep up to 30 ms, a
    decode step of this model takes about 1 ms, so rows hold for many steps, a different number in each run);
    with the holds removed the batch is the same: tokens, roles and rewards exactly, logprobs to the float32
    rounding of float64 logits over differently masked caches (tests/rounding.py)."""
    model, tok = _model("=", scale=10.0, dtype=torch.float64)

    def run(jitter_seed: int | None, delay: float = 0.03):
        return sample_episodes(model, tok, _slow_rows(jitter_seed, delay), temperature=1.0, overlap_tools=True,
                               generator=torch.Generator().manual_seed(3))

    (a, stats), (b, _), (c, _) = run(None, 0.0), run(1), run(2)
    for other in (b, c):
        assert torch.equal(a.input_ids_B_T, other.input_ids_B_T) and torch.equal(a.roles_B_T, other.roles_B_T)
        assert torch.equal(a.rewards_B, other.rewards_B)
        torch.testing.assert_close(a.sampler_logprobs_B_T, other.sampler_logprobs_B_T, atol=1e-6, rtol=0)
    assert sum(s.turns >= 2 for s in stats) >= 3
    # laid out as any batch: left padding, the prompt and the window without a gap, right padding
    for mask in a.attention_mask_B_T.tolist():
        text = "".join(map(str, mask))
        assert text.strip("0") == "1" * text.count("1")


def test_a_tool_episode_counts_each_call_of_a_turn() -> None:
    problem = Problem("lookup:ab=", str(envs.get_domain("tool_lookup").tools["get"].fn("ab")), "tool_lookup", 1)
    episode = ToolEpisode(problem, TOOLS, envs.get_domain("tool_lookup").verify, Limits(max_parallel_calls=2))
    reply = episode.step("get:ab get:ab mul:1,2")
    assert reply.observation == f"{problem.answer} {problem.answer} err:at most 2 calls a turn"
    assert episode.stats.tool_calls == 3 and episode.stats.malformed_calls == 1 and episode.stats.tool_errors == 1
    assert episode.step(problem.answer).reward == 1.0


def test_a_chat_turns_results_are_one_tool_message_each() -> None:
    """Chat: two `<tool_call>` blocks get two `tool` messages, rendered together as the observation (and a user
    simulator's message as a `user` one), the same in a gold trajectory as in sampling."""
    tok = build_char_tokenizer(envs.ALPHABET + "<>_")
    tok.chat_template = CHATML.replace("<e>", "<eos>")
    fmt = PromptFormat(chat_template=True)
    problem = Problem("mul:2*3=", "6", "tool_mul", 1)
    episode = ToolEpisode(problem, TOOLS, envs.get_domain("tool_mul").verify, Limits(), chat=True)
    turn = ('<tool_call>{"name": "mul", "arguments": {"a": 2, "b": 3}}</tool_call>'
            '<tool_call>{"name": "mul", "arguments": {"a": 1, "b": 6}}</tool_call>')
    assert episode.step(turn).observation == "6 6"
    assert [m["role"] for m in episode.messages] == ["user", "assistant", "tool", "tool"]
    rendered = tok.decode(observation_ids(tok, fmt, episode.messages, TOOLS))
    assert rendered == "<s>tool:6<eos><s>tool:6<eos><s>assistant:"
    ids, _ = trajectory_ids(tok, fmt, problem.prompt, [("model", "x"), ("env", "6"), ("env", "6"), ("model", "6")],
                            TOOLS)
    assert "<s>assistant:x<eos><s>tool:6<eos><s>tool:6<eos><s>assistant:6<eos>" in tok.decode(ids)
    ids, _ = trajectory_ids(tok, fmt, problem.prompt, [("model", "x"), ("user", "more"), ("model", "6")], TOOLS)
    assert "<s>assistant:x<eos><s>user:more<eos><s>assistant:6<eos>" in tok.decode(ids)


def test_tools_in_processes_see_their_episode_but_their_writes_stay_there() -> None:
    """tool_processes: the forked call reads the problem and the state as they were; what it writes to the state
    stays in its process (docs/AGENTS.md: a stateful tool that writes its state runs on threads)."""

    def mark(ctx: ToolContext, key: str) -> str:
        """Append to the state and answer with the prompt."""
        ctx.state.append(key)
        return f"{ctx.problem.prompt[:3]}{len(ctx.state)}"

    problem = Problem("abc=", "1", "marks", 1)
    for processes, kept in ((False, ["x", "y"]), (True, [])):
        state: list[str] = []
        episode = ToolEpisode(problem, {"mark": tool(mark)}, lambda p, a: 1.0,
                              Limits(tool_processes=processes, max_parallel_calls=1), state=state)
        assert episode.step("mark:x").observation == "abc1"
        assert episode.step("mark:y").observation == ("abc2" if not processes else "abc1")
        assert state == kept
