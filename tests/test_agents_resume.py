"""An agentic MOPD stage (tool-use episodes beside a single-turn domain) cut after a checkpoint, or killed with
SIGKILL mid-stage, resumes to the uninterrupted run's metrics and weights, as the single-turn stages do (issue 18);
its report shows the agent figures."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from mopd.execution.runner import run_recipe
from mopd.recipe.load import load_recipe
from mopd.report.run_files import read_final_eval
from mopd.stages import rl as rl_module

from .test_agents_sampling import one_thread  # noqa: F401  (autouse: one torch thread)

RECIPE = textwrap.dedent(
    """\
    name: agents_resume
    seed: 0
    domains: [tool_lookup, reversal]
    eval: {size: 4, max_new_tokens: 8}
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
        steps: 3
        batch_size: 6
      teacher: {kind: rlvr, init: base, domains: [tool_lookup], steps: 1, batch_size: 2, group_size: 2}
      student:
        kind: mopd
        init: base
        teachers: {tool_lookup: teacher, reversal: teacher}
        steps: 4
        batch_size: 2
        group_size: 2
        alpha: 0.5
        checkpoint_every: 2
    """
)


def test_agentic_mopd_stage_cut_after_a_checkpoint_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "r.yaml").write_text(RECIPE)
    loaded = load_recipe(tmp_path / "r.yaml")
    run_recipe(loaded, tmp_path / "whole", Console(quiet=True))

    real, calls = rl_module.policy_loss, {"n": 0}

    def crash_on_third_student_step(model, batch, cfg, *args, **kwargs):
        calls["n"] += cfg.teachers is not None  # the teacher's own RLVR steps have no teachers
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill after the step-2 checkpoint")
        return real(model, batch, cfg, *args, **kwargs)

    monkeypatch.setattr(rl_module, "policy_loss", crash_on_third_student_step)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(loaded, tmp_path / "cut", Console(quiet=True))
    cut = tmp_path / "cut" / "student"
    assert (cut / "checkpoints" / "step-0000002").exists() and not (cut / "final").exists()
    before = (cut / "metrics.jsonl").read_text().splitlines()
    monkeypatch.setattr(rl_module, "policy_loss", real)
    run_recipe(loaded, tmp_path / "cut", Console(quiet=True))

    def rows(stage: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(x).items() if not k.startswith("time")}
                for x in (stage / "metrics.jsonl").read_text().splitlines()]

    whole = tmp_path / "whole" / "student"
    assert (cut / "metrics.jsonl").read_text().splitlines()[:2] == before[:2]  # resumed, not restarted
    assert rows(cut) == rows(whole)
    assert any("episode/tool_call_rate/tool_lookup" in r for r in rows(whole))
    assert (cut / "final" / "model.safetensors").read_bytes() == (whole / "final" / "model.safetensors").read_bytes()
    # the report adds the agent figures of every stage's held-out episodes (tool-use domains only)
    report = (tmp_path / "whole" / "report.md").read_text()
    ev = read_final_eval(whole)["tool_lookup"]
    assert "## Agent episodes (tool-use domains)" in report and "| stage | tool_lookup: tool calls / length |" in report
    assert f"| student | {ev['tool_call_rate']:.0%} / {ev['episode_length']:.1f} |" in report


@pytest.mark.slow
def test_kill_9_during_an_agentic_mopd_stage_then_rerun_gives_the_uninterrupted_run(tmp_path: Path) -> None:
    """A real SIGKILL to the whole `mopd run` process group while the agentic student trains, then the same command
    again: the student resumes from its last checkpoint (the lines before it untouched) and ends with exactly the
    metrics and weights of a run that was never killed (both runs are `mopd run` processes on one torch thread)."""
    import subprocess
    import sys

    import yaml

    from .test_kill_resume import kill_after_first_checkpoint

    data = yaml.safe_load(RECIPE)
    data["stages"]["student"].update(steps=40, checkpoint_every=4)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "mopd", "run", str(path), "--out", str(out), "--threads", "1"]

    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(command(tmp_path / "whole"), check=True, timeout=300, **quiet)
    out = tmp_path / "cut"
    kill_after_first_checkpoint(command(out), out / "student", poll=0.02, settle=0.2)
    ckpts = out / "student" / "checkpoints"
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    kept = [x for x in (out / "student" / "metrics.jsonl").read_text().splitlines()
            if x.strip() and json.loads(x)["step"] <= killed_at]
    subprocess.run(command(out), check=True, timeout=300, **quiet)

    def rows(stage: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(x).items() if not k.startswith("time")}
                for x in (stage / "metrics.jsonl").read_text().splitlines()]

    lines = (out / "student" / "metrics.jsonl").read_text().splitlines()
    assert lines[:len(kept)] == kept and len(kept) == killed_at  # resumed, not restarted
    assert rows(out / "student") == rows(tmp_path / "whole" / "student")
    assert any("episode/tool_call_rate/tool_lookup" in r for r in rows(out / "student"))
    assert (out / "student" / "final" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "student" / "final" / "model.safetensors").read_bytes()
