"""Environments written with `verifiers` as mopd domains (`envs.verifiers_env`): the rubric gives every reward,
the toolset answers tool calls, misbehaving tools become observations, a bad rubric is one line, and a recipe
trains on them end to end (SFT on demonstrated trajectories, GRPO, MOPD). The environments are defined in
tests/verifiers_calc_plugin.py; nothing is downloaded."""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path

import pytest
from rich.console import Console

pytest.importorskip("verifiers.v1")

from mopd.envs import load_plugin  # noqa: E402
from mopd.envs.base import DomainError  # noqa: E402
from mopd.envs.tool_domains import is_agentic  # noqa: E402
from mopd.envs.verifiers_env import verifiers_domain  # noqa: E402
from mopd.execution.runner import run_recipe  # noqa: E402
from mopd.recipe.load import load_recipe  # noqa: E402

PLUGIN = Path(__file__).with_name("verifiers_calc_plugin.py")


@pytest.fixture(scope="module")
def envs():
    return load_plugin(PLUGIN)


def test_a_single_turn_taskset_is_a_domain_scored_by_its_rubric(envs) -> None:
    add = envs.ADD
    assert not is_agentic(add)
    held = add.eval_set(100)
    train = add.sample_train(random.Random(0), 200)
    assert len(held) == 12 and not {p.prompt for p in held} & {p.prompt for p in train}
    again = verifiers_domain("vf_add", envs.AddTaskset(envs.vf.TasksetConfig()), eval_size=12)
    assert [p.prompt for p in again.eval_set(12)] == [p.prompt for p in held]  # fixed by (name, seed)
    p = held[0]
    a, b = map(int, p.prompt[:-1].split("+"))
    assert p.answer == str(a + b)
    assert add.verify(p, str(a + b)) == 1.0 and add.verify(p, str(a + b + 1)) == 0.0


def test_a_tool_episode_is_answered_by_the_toolset_and_scored_on_the_whole_trace(envs) -> None:
    mul = envs.MUL
    assert is_agentic(mul) and set(mul.tools) == {"mul", "boom", "slow", "big"}
    p = mul.eval_set(1)[0]
    a, b = map(int, p.prompt[len("mul:"):-1].split("*"))
    episode = mul.start(p)
    first = episode.step(f"mul:{a},{b}")
    assert first.observation == str(a * b) and first.reward == 0.0
    last = episode.step(str(a * b))
    assert last.observation is None and last.reward == 1.0
    assert episode.stats.turns == 2 and episode.stats.tool_calls == 1 and episode.stats.tool_errors == 0
    # the rubric reads the trace: the right answer without a tool call scores 0
    assert mul.start(p).step(str(a * b)).reward == 0.0
    assert mul.verify(p, str(a * b)) == 0.0
    # a Ray worker gets the domain pickled: it rebuilds its tools' event loop on first use
    cloudpickle = pytest.importorskip("cloudpickle")
    copy = cloudpickle.loads(cloudpickle.dumps(mul))
    episode = copy.start(p)
    assert episode.step(f"mul:{a},{b}").observation == str(a * b) and episode.step(str(a * b)).reward == 1.0
    # SFT's gold trajectory: the demonstration played through the tools
    train = mul.sample_train(random.Random(0), 1)[0]
    x, y = map(int, train.prompt[len("mul:"):-1].split("*"))
    assert train.meta["trajectory"] == [("model", f"mul:{x},{y}"), ("env", str(x * y)), ("model", str(x * y))]


def test_misbehaving_tools_and_calls_become_observations(envs) -> None:
    mul = envs.MUL
    p = mul.eval_set(1)[0]
    episode = mul.start(p)
    assert episode.step("boom:").observation.startswith("err:")
    assert episode.stats.tool_errors == 1
    started = time.monotonic()
    assert episode.step("slow:4").observation == "err:timeout"
    assert time.monotonic() - started < 3  # tool_time_s is 0.5
    end = episode.step("big:")  # the third turn is the last allowed (max_turns 3): a call there ends it, reward 0
    assert end.observation is None and end.reward == 0.0
    episode = mul.start(p)
    big = episode.step("big:")
    assert big.observation == "9" * 8 and episode.stats.truncated_observations == 1
    assert episode.step("mul:1").observation == "err:mul takes 2 args"
    assert episode.step("nope:1").observation is None  # `nope` is not a tool: the turn is the (wrong) answer


def test_a_rubric_out_of_contract_is_one_domain_error_line(envs) -> None:
    vf = envs.vf

    class Loud(envs.AddTask):
        @vf.reward(weight=2.0)
        async def exact(self, trace: vf.Trace) -> float:
            return 1.0

    class Broken(envs.AddTask):
        @vf.reward
        async def exact(self, trace: vf.Trace) -> float:
            raise KeyError("no such field")

    class Sandboxed(envs.AddTask):
        @vf.reward
        async def exact(self, trace: vf.Trace, runtime) -> float:
            return 1.0

    with pytest.raises(DomainError, match="reward 'exact' needs a verifiers runtime"):  # refused when built
        class Tasks(vf.Taskset[Sandboxed, vf.TasksetConfig]):
            def load(self):
                return [Sandboxed(envs.AddData(prompt=f"{i}+1=", answer=str(i + 1)), self.config.task)
                        for i in range(8)]

        verifiers_domain("vf_bad", Tasks(vf.TasksetConfig()), eval_size=2)

    for task_cls, needle in ((Loud, "gave 2.0, not a reward in [0, 1]"), (Broken, "rubric raised")):
        class Tasks(vf.Taskset[task_cls, vf.TasksetConfig]):
            def load(self, task_cls=task_cls):
                return [task_cls(envs.AddData(prompt=f"{i}+1=", answer=str(i + 1)), self.config.task)
                        for i in range(8)]

        domain = verifiers_domain("vf_bad", Tasks(vf.TasksetConfig()), eval_size=2)
        with pytest.raises(DomainError) as e:
            domain.verify(domain.eval_set(1)[0], "1")
        assert needle in str(e.value) and "\n" not in str(e.value) and "'vf_bad'" in str(e.value)


RECIPE = f"""\
name: vf
seed: 0
domains: [vf_add, vf_mul]
plugins: [{PLUGIN}]
eval: {{size: 6, max_new_tokens: 8}}
stages:
  base: {{kind: pretrain, model: {{hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}},
          steps: 30, batch_size: 16, lr: 3.0e-3}}
  sft: {{kind: sft, init: base, steps: 30, batch_size: 16, lr: 3.0e-3}}
  teacher_mul: {{kind: rlvr, init: sft, domains: [vf_mul], steps: 2, batch_size: 2, group_size: 2}}
  student: {{kind: mopd, init: sft, teachers: {{vf_add: sft, vf_mul: teacher_mul}}, steps: 2, batch_size: 4,
            group_size: 2}}
"""


def test_a_recipe_trains_on_verifiers_environments_end_to_end(envs, tmp_path: Path) -> None:
    (tmp_path / "vf.yaml").write_text(RECIPE)
    loaded = load_recipe(tmp_path / "vf.yaml")
    run_recipe(loaded, tmp_path / "run", Console(file=io.StringIO()))
    rows = [json.loads(line) for line in (tmp_path / "run" / "student" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "episode/tool_call_rate/vf_mul" in r]
    assert steps, "the student played vf_mul as episodes"
    final = json.loads((tmp_path / "run" / "student" / "final" / "mopd.json").read_text())["metrics"]["eval"]
    assert set(final) >= {"vf_add", "vf_mul"}
    # SFT on the demonstrated trajectories taught the call format: the SFT model calls the tool
    sft_eval = json.loads((tmp_path / "run" / "sft" / "final" / "mopd.json").read_text())["metrics"]["eval"]
    assert sft_eval["vf_mul"].get("tool_call_rate", 0) > 0, sft_eval["vf_mul"]


def test_a_prompt_outside_the_tiny_alphabet_is_one_line_at_load(envs, tmp_path: Path) -> None:
    from mopd.core.errors import RecipeError

    plugin = tmp_path / "upper.py"
    plugin.write_text(
        "import verifiers.v1 as vf\n"
        f"import importlib.util, sys\nsys.path.insert(0, {str(PLUGIN.parent)!r})\n"
        "from mopd.envs import load_plugin\n"
        f"calc = load_plugin({str(PLUGIN)!r})\n"
        "from mopd.envs.verifiers_env import register_verifiers_domain\n"
        "class Tasks(vf.Taskset[calc.AddTask, vf.TasksetConfig]):\n"
        "    def load(self):\n"
        "        return [calc.AddTask(calc.AddData(prompt=f'Sum {i}+1=', answer=str(i + 1)), self.config.task)"
        " for i in range(8)]\n"
        "register_verifiers_domain('vf_upper', Tasks(vf.TasksetConfig()), eval_size=2)\n")
    text = RECIPE.replace(f"plugins: [{PLUGIN}]", f"plugins: [{plugin}]").replace("[vf_add, vf_mul]", "[vf_upper]")
    text = text[: text.index("  teacher_mul")]
    (tmp_path / "vf.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"1 character\(s\) of domain 'vf_upper' are not in the tiny model"):
        load_recipe(tmp_path / "vf.yaml")


PACKAGE = '''\
import verifiers.v1 as vf

__all__ = ["CountTaskset"]


class CountData(vf.TaskData):
    answer: str


class CountTask(vf.Task[CountData]):
    @vf.reward
    async def exact(self, trace: vf.Trace) -> float:
        return float((trace.last_reply or "").strip() == self.data.answer)


class CountConfig(vf.TasksetConfig):
    count: int = 20


class CountTaskset(vf.Taskset[CountTask, CountConfig]):
    def load(self):
        return [CountTask(CountData(prompt=f"{i}+1=", answer=str(i + 1)), self.config.task)
                for i in range(self.config.count)]
'''


def test_an_installed_taskset_is_a_recipe_domain_by_its_id(tmp_path: Path, monkeypatch) -> None:
    """`domains: [{name, verifiers: ID, settings}]`: the taskset package loaded as verifiers loads it, its config
    from `settings`; a package that is not there, or a bad setting, is one line at load."""
    from mopd.core.errors import RecipeError

    (tmp_path / "mopd_test_count_env").mkdir()
    (tmp_path / "mopd_test_count_env" / "__init__.py").write_text(PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = "{name: count, verifiers: mopd_test_count_env, settings: {count: 24}, eval_size: 4}"
    text = RECIPE.replace("domains: [vf_add, vf_mul]", f"domains: [vf_add, {entry}]").replace(
        "vf_mul: teacher_mul", "count: sft")
    text = text.replace("domains: [vf_mul]", "domains: [count]")
    (tmp_path / "vf.yaml").write_text(text)
    count = load_recipe(tmp_path / "vf.yaml").domains["count"]
    held = count.eval_set(10)
    assert len(held) == 4 and len({p.prompt for p in count.sample_train(random.Random(0), 400)}) == 20
    p = held[0]
    assert count.verify(p, p.answer) == 1.0 and count.verify(p, "x") == 0.0 and not is_agentic(count)

    for bad, needle in ((entry.replace("mopd_test_count_env", "mopd_no_such_env"), "'mopd_no_such_env': "
                         "ModuleNotFoundError: taskset 'mopd_no_such_env' not found"),
                        (entry.replace("count: 24", "count: many"), "ValidationError")):
        (tmp_path / "bad.yaml").write_text(text.replace(entry, bad))
        with pytest.raises(RecipeError) as e:
            load_recipe(tmp_path / "bad.yaml")
        assert needle in str(e.value) and "\n" not in str(e.value) and "domains.1.verifiers: " in str(e.value), \
            str(e.value)


MUL_PACKAGE = '''\
import verifiers.v1 as vf

__all__ = ["MulTaskset"]


class Tools(vf.Toolset[vf.ToolsetConfig]):
    TOOL_PREFIX = None

    @vf.tool
    async def mul(self, a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b


class MulData(vf.TaskData):
    answer: str
    a: int
    b: int


class MulTask(vf.Task[MulData]):
    @classmethod
    def toolsets(cls, config):
        return [Tools(vf.ToolsetConfig())]

    @vf.reward
    async def exact(self, trace: vf.Trace) -> float:
        return float((trace.last_reply or "").strip() == self.data.answer)


class MulTaskset(vf.Taskset[MulTask, vf.TasksetConfig]):
    def load(self):
        return [MulTask(MulData(prompt=f"mul:{a}*{b}=", answer=str(a * b), a=a, b=b), self.config.task)
                for a in range(11, 19) for b in (3, 7)]


def demonstrate(data):
    return [f"mul:{data.a},{data.b}", data.answer]
'''

DEMO_RECIPE = """\
name: vf_demo
seed: 0
domains: [{entry}]
eval: {{size: 4, max_new_tokens: 8}}
stages:
  base: {{kind: pretrain, model: {{hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}},
          steps: 2, batch_size: 4}}
  sft: {{kind: sft, init: base, steps: 2, batch_size: 4}}
"""


def _demo_recipe(tmp_path: Path, monkeypatch, extra: str = "") -> Path:
    package = tmp_path / "mopd_test_mul_env"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(MUL_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "vf_demo.yaml"
    path.write_text(DEMO_RECIPE.format(entry="{name: calc, verifiers: mopd_test_mul_env, eval_size: 4" + extra + "}"))
    return path


def test_a_yaml_taskset_takes_its_demonstration_from_a_file_or_a_generator(tmp_path: Path, monkeypatch) -> None:
    """Issue 38: `demonstration:` on a taskset declared in YAML, a JSONL file of each task's turns or a generator,
    gives SFT the gold trajectories played through the taskset's tools (the same from either)."""
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"mul:{a}*{b}=", "turns": [f"mul:{a},{b}", str(a * b)]}) + "\n"
                             for a in range(11, 19) for b in (3, 7)))
    (tmp_path / "gen.py").write_text("def demonstrate(data):\n    return [f'mul:{data.a},{data.b}', data.answer]\n")
    trajectories = []
    for ref in ("demos.jsonl", "gen.py:demonstrate", "mopd_test_mul_env:demonstrate"):
        loaded = load_recipe(_demo_recipe(tmp_path, monkeypatch, f", demonstration: {ref}"))
        calc = loaded.domains["calc"]
        problems = calc.eval_set(4) + calc.sample_train(random.Random(0), 8)
        trajectories.append([p.meta["trajectory"] for p in problems])
        assert loaded.warnings == [], ref
    assert trajectories[0] == trajectories[1] == trajectories[2]
    first = trajectories[0][0]
    a, b = (int(x) for x in first[0][1].split(":")[1].split(","))
    assert first == [("model", f"mul:{a},{b}"), ("env", str(a * b)), ("model", str(a * b))]  # the tool answered


def test_a_tool_taskset_without_a_demonstration_from_scratch_is_warned_before_compute(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    from typer.testing import CliRunner

    from mopd.cli import app

    path = _demo_recipe(tmp_path, monkeypatch)
    [warning] = load_recipe(path).warnings
    assert "vf_demo.yaml:3: domains.0" in warning and "'calc' has no demonstration" in warning
    assert "'base', a model built from scratch" in warning and "0% tool calls" in warning and "score 0" in warning
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 0 and res.output.startswith("warning: ") and "0% tool calls" in res.output


@pytest.mark.parametrize(("extra", "files", "needle"), [
    (", demonstration: demos.jsonl", {"demos.jsonl": '{"prompt": "mul:11*3=", "turns": ["mul:11,3", "33"]}\n'},
     "domains.0.demonstration: 'mopd_test_mul_env': DomainError: domain 'calc': the demonstration has no turns for "
     "the task whose prompt is"),
    (", demonstration: demos.jsonl", {"demos.jsonl": '{"prompt": "mul:11*3=", "turns": []}\n'},
     'demos.jsonl:1: each line is {"prompt": "...", "turns": ["...", ...]}'),
    (", demonstration: demos.jsonl", {"demos.jsonl": "{cut\n"}, "demos.jsonl:1: not JSON"),
    (", demonstration: missing.jsonl", {}, "missing.jsonl: cannot be read (FileNotFoundError)"),
    (", demonstration: nothing", {}, "'nothing': not a .jsonl file nor a generator"),
    (", demonstration: gen.py:absent", {"gen.py": "x = 1\n"}, "gen.py has no function 'absent'"),
    (", demonstration: gen.py:f", {"gen.py": "raise RuntimeError('boom')\n"}, "raised RuntimeError: boom"),
])
def test_a_bad_demonstration_is_one_line_at_its_key(tmp_path: Path, monkeypatch, extra, files, needle) -> None:
    from mopd.core.errors import RecipeError

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(_demo_recipe(tmp_path, monkeypatch, extra))
    assert needle in str(e.value) and "\n" not in str(e.value) and "domains.0.demonstration" in str(e.value), \
        str(e.value)


def test_a_yaml_taskset_sets_its_parallel_call_limit(tmp_path: Path, monkeypatch) -> None:
    """`max_parallel_calls:` on a taskset declared in YAML reaches its episodes: two calls in one turn under a
    limit of 1 give the second an error observation the model can read, and both calls are counted."""
    loaded = load_recipe(_demo_recipe(tmp_path, monkeypatch, ", demonstration: mopd_test_mul_env:demonstrate, "
                                                             "max_parallel_calls: 1"))
    calc = loaded.domains["calc"]
    assert calc.limits.max_parallel_calls == 1
    [problem] = calc.eval_set(1)
    episode = calc.start(problem)
    reply = episode.step("mul:12,3 mul:4,5")
    assert reply.observation == "36 err:at most 1 calls a turn"
    assert episode.stats.tool_calls == 2 and episode.stats.malformed_calls == 1
