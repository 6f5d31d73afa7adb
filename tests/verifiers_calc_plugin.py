"""Two environments written with `verifiers` (v1), as a user would write them, registered as mopd domains: the
plugin file of tests/test_verifiers_env.py (loaded by path, as a recipe's `plugins:` entry loads it).

    vf_add  a+b=     single turn, rubric: exact answer
    vf_mul  mul:a*b= a toolset (`mul`, and three misbehaving tools), rubric: the right answer after a tool call
"""

from __future__ import annotations

import asyncio

import verifiers.v1 as vf

from mopd.envs.episode import Limits
from mopd.envs.verifiers_env import register_verifiers_domain


class AddData(vf.TaskData):
    answer: str


class AddTask(vf.Task[AddData]):
    @vf.reward
    async def exact(self, trace: vf.Trace) -> float:
        return float((trace.last_reply or "").strip() == self.data.answer)


class AddTaskset(vf.Taskset[AddTask, vf.TasksetConfig]):
    def load(self) -> list[AddTask]:
        return [AddTask(AddData(prompt=f"{a}+{b}=", answer=str(a + b)), self.config.task)
                for a in range(10, 30) for b in range(1, 4)]


class CalcTools(vf.Toolset[vf.ToolsetConfig]):
    TOOL_PREFIX = None  # bare tool names: `mul:a,b` in the character models' call format

    @vf.tool
    async def mul(self, a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    @vf.tool
    async def boom(self) -> int:
        """Always raises."""
        raise ValueError("boom")

    @vf.tool
    async def slow(self, a: int) -> int:
        """Answers after five seconds."""
        await asyncio.sleep(5)
        return a

    @vf.tool
    async def big(self) -> str:
        """One megabyte of text."""
        return "9" * 1_000_000


class MulData(vf.TaskData):
    answer: str
    a: int
    b: int


class MulTask(vf.Task[MulData]):
    @classmethod
    def toolsets(cls, config) -> list[vf.Toolset]:
        return [CalcTools(vf.ToolsetConfig())]

    @vf.reward
    async def correct_with_tool(self, trace: vf.Trace) -> float:
        used = any(m.tool_calls for m in trace.messages if m.role == "assistant")
        return float(used and (trace.last_reply or "").strip() == self.data.answer)


class MulTaskset(vf.Taskset[MulTask, vf.TasksetConfig]):
    def load(self) -> list[MulTask]:
        return [MulTask(MulData(prompt=f"mul:{a}*{b}=", answer=str(a * b), a=a, b=b), self.config.task)
                for a in range(11, 41) for b in (3, 7)]


def demonstrate(data: MulData) -> list[str]:
    return [f"mul:{data.a},{data.b}", data.answer]


ADD = register_verifiers_domain("vf_add", AddTaskset(vf.TasksetConfig()), eval_size=12)
MUL = register_verifiers_domain("vf_mul", MulTaskset(vf.TasksetConfig()), eval_size=12, demonstration=demonstrate,
                                limits=Limits(max_turns=3, max_tokens=24, tool_time_s=0.5, max_observation_chars=8))
