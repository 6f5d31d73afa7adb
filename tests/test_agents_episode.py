"""The episode protocol and tools (issue 18): calls parse in both formats, a broken tool is an observation, the
turn limit ends an episode with reward 0, and the built-in tool domains need and reward their tools."""

from __future__ import annotations

import random
import time

import pytest

from mopd.envs import ALPHABET, get_domain
from mopd.envs.episode import Limits, ToolEpisode, observation_ids, prompt_ids, trajectory_ids
from mopd.envs.tool_domains import GET, MUL, ToolDomain, get, is_agentic
from mopd.envs.tools import CallError, ToolCall, parse_char_call, parse_chat_call, run_tool, tool, tool_schema
from mopd.models.prompting import RAW, PromptFormat
from mopd.models.tokenizer import build_char_tokenizer

TOOLS = {"mul": MUL, "get": GET}


def test_tool_from_function_and_schema() -> None:
    assert MUL.params == (("a", int), ("b", int))
    assert MUL.description == "Multiply two integers."
    assert tool_schema(MUL) == {"type": "function", "function": {
        "name": "mul", "description": "Multiply two integers.", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"]}}}

    def untyped(x):  # noqa: ANN001
        return x

    with pytest.raises(TypeError, match="annotation"):
        tool(untyped)


def test_char_calls_parse_and_bind_types() -> None:
    call = parse_char_call("mul:12,34", TOOLS)
    assert isinstance(call, ToolCall) and call.tool is MUL and call.args == {"a": 12, "b": 34}
    assert parse_char_call("408", TOOLS) is None  # a final answer
    assert parse_char_call("get:qwk", TOOLS).args == {"key": "qwk"}
    assert parse_char_call("add:1,2", TOOLS) == CallError("err:unknown tool add")
    assert parse_char_call("mul:12", TOOLS) == CallError("err:mul takes 2 args")
    assert parse_char_call("mul:1x,2", TOOLS) == CallError("err:bad args for mul")


def test_chat_calls_parse() -> None:
    call = parse_chat_call('ok <tool_call>{"name": "mul", "arguments": {"a": 3, "b": 4}}</tool_call>', TOOLS)
    assert isinstance(call, ToolCall) and call.args == {"a": 3, "b": 4}
    assert parse_chat_call("the answer is 12", TOOLS) is None
    assert isinstance(parse_chat_call("<tool_call>{not json</tool_call>", TOOLS), CallError)
    assert parse_chat_call('<tool_call>{"name": "mul", "arguments": {"a": 3}}</tool_call>', TOOLS) == CallError(
        "err:mul takes a,b")


def _raises(a: int) -> int:
    """Divide by zero."""
    return a // 0


def _hangs(a: int) -> int:
    """Sleep for a long time."""
    time.sleep(30)
    return a


def _huge(a: int) -> str:
    """Return a megabyte."""
    return "9" * 1_000_000


def test_broken_tools_become_observations() -> None:
    raised = run_tool(ToolCall(tool(_raises), {"a": 1}), time_limit_s=1.0, max_chars=16)
    assert raised.error and raised.text == "err:zerodivisionerror"
    start = time.perf_counter()
    hung = run_tool(ToolCall(tool(_hangs), {"a": 1}), time_limit_s=0.2, max_chars=16)
    assert hung.error and hung.text == "err:timeout" and time.perf_counter() - start < 2
    huge = run_tool(ToolCall(tool(_huge), {"a": 1}), time_limit_s=1.0, max_chars=16)
    assert huge.truncated and not huge.error and huge.text == "9" * 16


def _episode(limits: Limits = Limits(max_turns=3), tools=None) -> ToolEpisode:
    d = get_domain("tool_mul")
    problem = d.sample(random.Random(0), 1)
    return ToolEpisode(problem, tools or d.tools, d.verify, limits)


def test_episode_runs_tools_counts_errors_and_ends_with_the_answer() -> None:
    ep = _episode(Limits(max_turns=4))
    a, b = ep.problem.prompt[4:-1].split("*")
    assert ep.step("mul:12").observation == "err:mul takes 2 args"
    assert ep.step(f"mul:{a},{b}").observation == str(int(a) * int(b))
    end = ep.step(str(int(a) * int(b)))
    assert end.observation is None and end.reward == 1.0
    assert (ep.stats.turns, ep.stats.tool_calls, ep.stats.tool_errors) == (3, 2, 1)


def test_broken_tool_in_an_episode_and_the_turn_limit() -> None:
    ep = _episode(Limits(max_turns=2, tool_time_s=0.2), tools={"mul": tool(_hangs, name="mul")})
    assert ep.step("mul:1").observation == "err:timeout"
    last = ep.step("mul:2")  # a tool call on the last allowed turn: the episode ends, reward 0
    assert last.observation is None and last.reward == 0.0
    assert ep.stats.tool_errors == 1 and ep.stats.tool_calls == 2
    assert _episode().cut("12") == 0.0


def test_tool_domains_need_their_tools_and_gold_trajectories_score_one() -> None:
    for name in ("tool_mul", "tool_lookup", "tool_chain"):
        d = get_domain(name)
        assert isinstance(d, ToolDomain) and is_agentic(d)
        for problem in d.eval_set(6):
            assert set(problem.prompt + problem.answer) <= set(ALPHABET)
            segments = d.trajectory(problem)
            assert segments[-1] == ("model", problem.answer)
            ep = d.start(problem)
            replies = [ep.step(text) for kind, text in segments if kind == "model"]
            assert replies[-1].reward == 1.0 and ep.stats.tool_calls == len(replies) - 1 >= 1
    assert not is_agentic(get_domain("addition"))
    chain = get_domain("tool_chain").sample(random.Random(1), 2)
    key = chain.prompt[6:].split("*")[0]
    assert [k for k, _ in get_domain("tool_chain").trajectory(chain)] == ["model", "env", "model", "env", "model"]
    assert get_domain("tool_chain").trajectory(chain)[1] == ("env", str(get(key)))


def test_trajectory_ids_render_as_the_sampler_does() -> None:
    tok = build_char_tokenizer(ALPHABET)
    ids, roles = trajectory_ids(tok, RAW, "mul:12*34=", [("model", "mul:12,34"), ("env", "408"), ("model", "408")],
                                TOOLS)
    text = tok.decode(ids)
    assert text == "<bos>mul:12*34=mul:12,34<eos>408=408<eos>"
    assert roles == [0] * 11 + [1] * 10 + [2] * 4 + [1] * 4
    assert observation_ids(tok, RAW, [{"role": "tool", "content": "408"}], None) == tok("408=").input_ids


CHATML = (
    "{% if tools %}<s>tools:{% for t in tools %}{{ t.function.name }} {% endfor %}{% endif %}"
    "{% for m in messages %}<s>{{ m.role }}:{{ m.content }}<e>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def test_chat_template_observations_follow_the_assistant_end_of_turn() -> None:
    """A ChatML-like template on the character tokenizer (`<s>`/`<e>` in the text become characters; its EOS
    ends the assistant's turn): the observation ids are the tool message and the next generation prompt."""
    tok = build_char_tokenizer(ALPHABET + "<>_")
    tok.chat_template = CHATML.replace("<e>", "<eos>")
    fmt = PromptFormat(chat_template=True)
    start = tok.decode(prompt_ids(tok, fmt, "mul:2*3=", TOOLS))
    assert start == "<s>tools:mul get <s>user:mul:2*3=<eos><s>assistant:"
    messages = [{"role": "user", "content": "mul:2*3="}, {"role": "assistant", "content": "x"},
                {"role": "tool", "content": "6"}]
    assert tok.decode(observation_ids(tok, fmt, messages, TOOLS)) == "<s>tool:6<eos><s>assistant:"
