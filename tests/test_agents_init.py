"""`mopd init --agent` (issue 38): the tool-use starter runs as written (`mopd init --agent DIR && mopd run
DIR/recipe.yaml`, here at a reduced scale) and its plugin uses the public API only: a state per episode, two calls
in one turn, a second tool. How much the full-scale recipe learns is measured in docs/AGENTS.md."""

from __future__ import annotations

import json
import random

from mopd.cli_tools.scaffold_agent import AGENT_DOMAIN, TOOLS_FILE
from mopd.envs import get_domain

from .test_cli_tools import invoke, one_error_line


def test_the_agent_starter_runs_as_written_at_a_reduced_scale(tmp_path, monkeypatch) -> None:
    from mopd.envs import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the plugin's registration stays in this test
    d = tmp_path / "agent"
    res = invoke("init", d, "--agent")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in d.iterdir()) == sorted(["recipe.schema.json", "recipe.yaml", TOOLS_FILE])
    text = (d / TOOLS_FILE).read_text()
    imports = [line for line in text.splitlines() if line.startswith(("from mopd", "import mopd"))]
    assert imports and all(line.startswith("from mopd.envs import ") for line in imports)  # the public API only
    out = tmp_path / "run"
    res = invoke("run", d / "recipe.yaml", "--scale", "0.005", "--out", out, "--threads", "1")
    assert res.exit_code == 0, res.output
    lineage = json.loads((out / "student" / "final" / "mopd.json").read_text())
    assert set(lineage["metrics"]["eval"]) == {AGENT_DOMAIN, "reversal"}
    assert f"{AGENT_DOMAIN}: tool calls / length" in (out / "report.md").read_text()
    # the plugin's domain, registered by the run: a gold trajectory makes two calls in its first turn
    problem = get_domain(AGENT_DOMAIN).sample(random.Random(0))
    first, *rest = problem.meta["trajectory"]
    assert first[0] == "model" and first[1].count("price:") == 2 and [k for k, _ in rest[:2]] == ["env", "env"]
    assert get_domain(AGENT_DOMAIN).verify(problem, problem.meta["trajectory"][-1][1]) == 1.0


def test_agent_refuses_domains_in_one_line(tmp_path) -> None:
    assert "--agent writes its own domains" in one_error_line(invoke("init", tmp_path / "a", "--agent",
                                                                     "--domains", "reversal"))


def test_the_tool_domain_example_in_agents_md_runs(monkeypatch, tmp_path) -> None:
    """docs/AGENTS.md's "Writing a tool domain" example, executed as written: it registers, and its gold
    trajectory is the one the page shows the shape of (two prices in one turn, then add, then the answer)."""
    from pathlib import Path

    from mopd.envs import base, load_plugin

    monkeypatch.setattr(base, "_REGISTRY", {k: v for k, v in base._REGISTRY.items() if k != "shop"})
    text = (Path(__file__).resolve().parents[1] / "docs" / "AGENTS.md").read_text()
    code = "# my_tools.py" + text.split("```python\n# my_tools.py", 1)[1].split("```", 1)[0]
    (tmp_path / "my_tools.py").write_text(code)
    load_plugin(tmp_path / "my_tools.py")
    problem = get_domain("shop").sample(random.Random(1))
    turns = [t for k, t in problem.meta["trajectory"] if k == "model"]
    assert turns[0].count("price:") == 2 and turns[1].startswith("add:") and turns[2] == problem.answer
