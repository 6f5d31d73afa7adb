"""Recipes with tool-use domains (issue 18): they load, and a stage that would play a tool domain's problems as
single turns is refused at load in one line (recipe/agent_checks.py)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from mopd.recipe.load import RecipeError, load_recipe

HEAD = textwrap.dedent(
    """\
    name: tools
    seed: 0
    domains: [tool_lookup, reversal]
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
        steps: 2
    """
)


def _load(tmp_path: Path, stage: str):
    (tmp_path / "r.yaml").write_text(HEAD + textwrap.indent(stage, "  "))
    return load_recipe(tmp_path / "r.yaml")


def test_sampling_stages_over_tool_domains_load(tmp_path: Path) -> None:
    loaded = _load(tmp_path, "rl: {kind: rlvr, init: base, steps: 1}\n"
                             "s: {kind: mopd, init: base, teachers: {tool_lookup: rl, reversal: rl}, steps: 1}\n")
    assert set(loaded.recipe.stages) == {"base", "rl", "s"}
    # a stage that lists only single-turn domains may sample them any way it likes
    _load(tmp_path, "rs: {kind: rejection_sampling, init: base, domains: [reversal], steps: 1}\n")


@pytest.mark.parametrize(("stage", "message"), [
    ("rs: {kind: rejection_sampling, init: base, steps: 1}\n",
     "stages.rs.domains: 'tool_lookup' is a tool-use domain, and a rejection_sampling stage samples single-turn answers"),
    ("d: {kind: dpo, init: base, domains: [tool_lookup], steps: 1}\n",
     "stages.d.domains: 'tool_lookup' is a tool-use domain, and a dpo stage samples single-turn answers"),
])
def test_single_turn_stages_over_tool_domains_fail_in_one_line(tmp_path: Path, stage: str, message: str) -> None:
    with pytest.raises(RecipeError) as e:
        _load(tmp_path, stage)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_judge_may_reward_the_single_turn_domains_of_a_stage_with_tool_domains_but_not_the_tool_domains(
    tmp_path: Path,
) -> None:
    judged = "rl: {kind: rlvr, init: base, steps: 1, reward: {judge: base, rubric: neat}}\n"
    with pytest.raises(RecipeError) as e:
        _load(tmp_path, judged)
    assert "stages.rl.reward: 'tool_lookup' is a tool-use domain, rewarded by its episodes" in str(e.value)
    # per domain: reversal judged, the tool domain keeps its episode reward
    loaded = _load(tmp_path, "rl: {kind: rlvr, init: base, steps: 1, "
                             "reward: {per_domain: {reversal: {judge: base, rubric: neat}}}}\n")
    assert "rl" in loaded.recipe.stages


def test_the_bundled_agentic_recipe_runs_at_a_reduced_scale(tmp_path_factory) -> None:
    """The bundled agentic recipe at a reduced scale: every stage (tool SFT, tool teachers, the single-turn
    teacher, the MOPD student over all four) runs, and its report has the agent-episodes table. The run is the
    one tests/test_recipe_expected.py checks the stored numbers of (one run for both; `mopd run --scale` itself
    is tested in tests/test_bundled_recipes.py)."""
    from tests.recipe_expected import group_runs

    run = group_runs("agents", tmp_path_factory)["agents"]
    loaded = load_recipe(run / "recipe.yaml")
    assert all((run / s / "final").is_dir() for s in loaded.order)
    report = (run / "report.md").read_text()
    assert "## Agent episodes (tool-use domains)" in report
    assert "tool_mul: tool calls / length" in report and "tool_chain: tool calls / length" in report
    # every eval wrote its transcripts; the MOPD student's carry each model turn's teacher KL, its tool turns the
    # tools' results (issue 38)
    from mopd.eval.transcripts import read_transcripts

    final = read_transcripts(sorted((run / "student" / "samples").glob("eval-*.jsonl"))[-1])
    assert {r["domain"] for r in final} == set(loaded.recipe.domains)
    summary = json.loads((run / "summary.json").read_text())
    for d in loaded.recipe.domains:  # the transcripts' rewards are the eval's: their mean is the score
        rewards = [r["reward"] for r in final if r["domain"] == d]
        assert sum(rewards) / len(rewards) == pytest.approx(summary["domains"][d]["student"])
    turns = [t for r in final for t in r["turns"]]
    assert all(isinstance(t.get("teacher_kl"), float) for t in turns if t["role"] == "assistant")
    assert all("teacher_kl" not in t for t in turns if t["role"] == "tool")
    assert all(list((run / s / "samples").glob("eval-*.jsonl")) for s in loaded.order)
    assert "## Transcripts (best and worst per domain)" in report
