"""End to end on a miniature recipe (seconds): lineage, caching, identity, determinism, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd.execution.runner import run_recipe
from mopd.recipe.load import load_recipe
from mopd.stages import driver as driver_module

STAGES = ["base", "sft", "teacher_add", "teacher_rev", "teacher_sort", "student"]
# every module whose stage runners call the driver's `train` (each imported it into its own namespace)
TRAIN_CALLERS = ("mopd.stages.run", "mopd.stages.rl", "mopd.stages.mopd", "mopd.stages.baselines")


def _patch_train(monkeypatch: pytest.MonkeyPatch, fn) -> None:
    for module in TRAIN_CALLERS:
        monkeypatch.setattr(f"{module}.train", fn)


def _run(recipe: Path, out: Path) -> dict:
    return run_recipe(load_recipe(recipe), out)


def _final_evals(out: Path) -> dict:
    return {s: json.loads((out / s / "final" / "mopd.json").read_text())["metrics"]["eval"] for s in STAGES}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    from .conftest import MINI_RECIPE

    d = tmp_path_factory.mktemp("run")
    recipe = d / "mini.yaml"
    recipe.write_text(MINI_RECIPE)
    out = d / "out"
    return recipe, out, _run(recipe, out)


def test_run_writes_checkpoints_lineage_report(finished_run) -> None:
    _, out, summary = finished_run
    for s in STAGES:
        final = out / s / "final"
        AutoModelForCausalLM.from_pretrained(final)
        AutoTokenizer.from_pretrained(final)
        lineage = json.loads((final / "mopd.json").read_text())
        assert lineage["stage"] == s and lineage["identity"] and lineage["version"]
        assert lineage["metrics"]["eval"].keys() == {"addition", "reversal", "sorting"}
        assert (out / s / "metrics.jsonl").exists()
        assert not (out / s / "checkpoints").exists()  # resumable checkpoints are cleared once final exists
    student = json.loads((out / "student" / "final" / "mopd.json").read_text())
    assert set(student["parents"]) == {"sft", "teacher_add", "teacher_rev", "teacher_sort"}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert set(on_disk) == {"recipe", "wall_seconds", "normalized_score", "min_teacher_gain", "domains", "warnings"}
    assert set(on_disk["domains"]) == {"addition", "reversal", "sorting"}
    for name in ("report.md", "reward.png", "reverse_kl.png", "entropy.png", "completion_len.png"):
        assert (out / name).stat().st_size > 0
    lines = [json.loads(x) for x in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    # the `auto` step settings the sampling stages chose, beside their identity: at the tiny shapes, the
    # computation the recipes always ran (one block of logits, the whole batch a pass)
    sizing = json.loads((out / "student" / "stage.json").read_text())["sizing"]
    assert sizing["logit_chunk"] is None and sizing["vocab_block"] is None and sizing["micro_batch_size"] is None
    assert "micro_batch_size" in sizing["chosen"] and 0 < sizing["estimated_peak_bytes"] <= 2**31
    assert all(any(k.startswith("mopd/reverse_kl/") for k in x) for x in lines if "loss" in x)
    split = ("time/sampling_s", "time/teachers_s", "time/learner_s", "time/update_s")  # where a step's time went
    steps = [x for x in lines if "loss" in x]
    assert all(x[k] >= 0 for x in steps for k in split) and all(x["time/teachers_s"] > 0 for x in steps)
    assert all(sum(b[k] for k in split) <= b["time"] - a.get("time", 0) + 0.05  # within the step's wall time
               for a, b in zip([{}, *steps], steps, strict=False))


def test_rerun_skips_finished_stages(finished_run) -> None:
    recipe, out, summary = finished_run
    mtimes = {s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns for s in STAGES}
    again = _run(recipe, out)
    assert {s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns for s in STAGES} == mtimes
    run = json.loads((out / "run.json").read_text())
    assert {s: run["stages"][s]["status"] for s in STAGES} == dict.fromkeys(STAGES, "cached")
    assert again["domains"] == summary["domains"]


def test_changing_one_teacher_reruns_only_its_dependents(finished_run, tmp_path: Path) -> None:
    recipe, out, _ = finished_run
    data = yaml.safe_load(recipe.read_text())
    data["stages"]["teacher_rev"]["lr"] = 2e-3
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data, sort_keys=False))
    _run(changed, out)
    run = json.loads((out / "run.json").read_text())
    status = {s: run["stages"][s]["status"] for s in STAGES}
    assert status == {"base": "cached", "sft": "cached", "teacher_add": "cached", "teacher_rev": "ran",
                      "teacher_sort": "cached", "student": "ran"}
    superseded = sorted(p.name for p in (out / ".superseded").iterdir())
    assert any(n.startswith("teacher_rev-") for n in superseded)  # the old teacher is kept, not deleted
    assert any(n.startswith("student-") for n in superseded)


def test_same_recipe_and_seed_give_identical_metrics(mini_recipe: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(mini_recipe, a) == {**_run(mini_recipe, b), "wall_seconds": _run_wall(a)}
    assert _final_evals(a) == _final_evals(b)

    def curves(out: Path) -> list[dict]:
        rows = [json.loads(x) for x in (out / "student" / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]

    assert curves(a) == curves(b)


def _run_wall(out: Path) -> float:
    return json.loads((out / "summary.json").read_text())["wall_seconds"]


def test_interrupted_stage_resumes_from_its_checkpoint(mini_recipe: Path, tmp_path: Path, monkeypatch) -> None:
    reference = _run(mini_recipe, tmp_path / "uninterrupted")

    out = tmp_path / "interrupted"
    real_train = driver_module.train

    def crashing_train(ctx, model_factory, loss_fn, **options):
        if ctx.name != "student":
            return real_train(ctx, model_factory, loss_fn, **options)

        def loss_then_crash(model, step):
            if step == 3:  # after the checkpoint at step 2
                raise KeyboardInterrupt("simulated crash")
            return loss_fn(model, step)

        return real_train(ctx, model_factory, loss_then_crash, **options)

    _patch_train(monkeypatch, crashing_train)
    with pytest.raises(KeyboardInterrupt):
        _run(mini_recipe, out)
    assert (out / "student" / "checkpoints" / "step-0000002" / "trainer_state.pt").exists()
    assert not (out / "student" / "final").exists()
    before = {s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns for s in STAGES[:-1]}

    _patch_train(monkeypatch, real_train)
    resumed_steps: list[int] = []
    real_loss = []

    def recording_train(ctx, model_factory, loss_fn, **options):
        def rec(model, step):
            resumed_steps.append(step)
            return loss_fn(model, step)

        real_loss.append(ctx.name)
        return real_train(ctx, model_factory, rec, **options)

    _patch_train(monkeypatch, recording_train)
    summary = _run(mini_recipe, out)
    assert real_loss == ["student"]  # finished stages were not redone
    assert resumed_steps == [2, 3]  # the student resumed after its step-2 checkpoint
    assert {s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns for s in STAGES[:-1]} == before
    steps = [json.loads(x)["step"] for x in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s < 4] == [1, 2, 3]  # no duplicated lines from the interrupted attempt
    # resuming is exact: the same final metrics as the uninterrupted run
    assert summary["domains"] == reference["domains"]
