"""The new MOPD keys end to end on the miniature recipe, with a warm-up SFT on teacher traces as the init."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from mopd.execution.runner import run_recipe
from mopd.recipe.load import load_recipe

from .conftest import MINI_RECIPE


def test_warmup_offpolicy_ft_then_mopd_with_schedules(tmp_path: Path) -> None:
    data = yaml.safe_load(MINI_RECIPE)
    teachers = data["stages"]["student"]["teachers"]
    stages = data["stages"]
    stages["warmup"] = {"kind": "offpolicy_ft", "init": "sft", "teachers": teachers, "steps": 2, "batch_size": 6}
    stages["student"] = stages.pop("student")  # keep the student last
    stages["student"].update(
        init="warmup", temperature=1.2, temperature_schedule="linear", temperature_end=0.8, filter_solved=True,
        curriculum=True, surprise_alpha=0.3, preflight={"kl_warn": 0.1, "prompts": 4},
    )
    path = tmp_path / "warmup.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    loaded = load_recipe(path)
    assert loaded.order.index("sft") < loaded.order.index("warmup") < loaded.order.index("student")
    out = tmp_path / "out"
    run_recipe(loaded, out, Console(file=io.StringIO()))

    lineage = json.loads((out / "student" / "final" / "mopd.json").read_text())
    assert "warmup" in lineage["parents"] and lineage["init"] == str(out / "warmup" / "final")
    rows = [json.loads(x) for x in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["sampling/temperature"] for r in steps] == pytest.approx([1.2, 1.2 - 0.4 / 3, 0.8 + 0.4 / 3, 0.8])
    assert all("filter/kept_frac" in r and "surprise/weight_mean" in r for r in steps)
    assert all(f"mopd/teacher_nll/{t}" in r for r in steps for t in teachers.values())
    preflight = json.loads((out / "student" / "preflight.json").read_text())
    assert set(preflight["teachers"]) == set(teachers.values())
    assert "## Teacher preflight" in (out / "report.md").read_text()
