"""Multi-round MOPD and staged teachers on a miniature recipe (seconds): lineage of a round-2 student, teacher
snapshots (`keep_every`), a teacher schedule, and an exact resume with snapshots and sample counts."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from mopd.envs import ALPHABET
from mopd.execution.resolve import resolve_stage
from mopd.execution.runner import run_recipe
from mopd.models.checkpoint import save_checkpoint
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.identity import stage_identities
from mopd.recipe.load import RecipeError, load_recipe
from mopd.stages import mopd as mopd_module
from mopd.stages import rl as rl_module
from mopd.stages import run as run_module
from mopd.stages.lineage import teacher_checkpoint
from mopd.stages.mopd import TeacherSchedule
from mopd.stages.resolved import ResolvedStage
from mopd.teachers.preflight import PreflightError

from .mini_compare import recipe

MOPD = "{kind: mopd, init: %s, teachers: %s, steps: %d, batch_size: 2, group_size: 2%s}"
ROUNDS = "\n".join([
    "student: " + MOPD % ("sft", "{reversal: teacher_rev, sorting: teacher_sort}", 2, ""),
    "staged: " + MOPD % ("sft", "{reversal: teacher_rev, sorting: teacher_sort}", 4,
                         ", teacher_schedule: [{until_step: 2, snapshot: 2}, {until_step: 4, snapshot: final}]"),
    "teacher_rev_r2: {kind: rlvr, init: student, domains: [reversal], steps: 2, batch_size: 2, group_size: 4}",
    "student_r2: " + MOPD % ("student", "{reversal: teacher_rev_r2, sorting: teacher_sort}", 2, ""),
]) + "\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rounds")
    (d / "r.yaml").write_text(recipe(ROUNDS))
    run_recipe(load_recipe(d / "r.yaml"), d / "out", Console(quiet=True))
    return d / "out"


def _lineage(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "final" / "mopd.json").read_text())


def test_round2_lineage_names_round1_student_and_refreshed_teachers(run: Path) -> None:
    r2 = _lineage(run, "student_r2")
    assert r2["init_stage"] == "student" and r2["init"] == str(run / "student" / "final")
    assert r2["parents"]["student"] == _lineage(run, "student")["identity"]
    refreshed, reused = r2["teachers"]["reversal"], r2["teachers"]["sorting"]
    assert refreshed == {"stage": "teacher_rev_r2", "identity": _lineage(run, "teacher_rev_r2")["identity"],
                         "checkpoint": str(run / "teacher_rev_r2" / "final")}
    assert reused == {"stage": "teacher_sort", "identity": _lineage(run, "teacher_sort")["identity"],
                      "checkpoint": str(run / "teacher_sort" / "final")}
    t2 = _lineage(run, "teacher_rev_r2")  # the refreshed teacher itself started from the round-1 student
    assert t2["init_stage"] == "student" and t2["parents"] == {"student": r2["parents"]["student"]}
    r1 = _lineage(run, "student")
    assert r1["teachers"]["reversal"]["stage"] == "teacher_rev" and r1["init_stage"] == "sft"


def test_keep_every_leaves_hf_snapshots_and_no_resumable_checkpoints(run: Path) -> None:
    snaps = sorted(p.name for p in (run / "teacher_rev" / "snapshots").iterdir())
    assert snaps == ["step-0000002"]  # every 2 of 4 steps; the last step is `final`
    AutoModelForCausalLM.from_pretrained(run / "teacher_rev" / "snapshots" / "step-0000002")
    assert not (run / "teacher_rev" / "checkpoints").exists()


def _staged_ctx(run: Path, stage: dict | None = None, **recipe: str) -> ResolvedStage:
    """The resolved `staged` stage of `run`, with stage settings and recipe keys overridden."""
    loaded = load_recipe(run / "recipe.yaml")
    r = loaded.recipe
    staged = r.stages["staged"].model_copy(update=stage or {})
    loaded = replace(loaded, recipe=r.model_copy(update={**recipe, "stages": {**r.stages, "staged": staged}}))
    return resolve_stage(loaded, "staged", run, stage_identities(loaded))


def test_teacher_schedule_uses_snapshots_first_then_final(run: Path) -> None:
    lineage = _lineage(run, "staged")["teachers"]["reversal"]["schedule"]
    snap = str(run / "teacher_rev" / "snapshots" / "step-0000002")
    assert lineage == [{"until_step": 2, "snapshot": 2, "checkpoint": snap},
                       {"until_step": 4, "snapshot": "final", "checkpoint": str(run / "teacher_rev" / "final")}]
    panels = TeacherSchedule(_staged_ctx(run))
    assert [panels.phase_of(i) for i in range(4)] == [0, 0, 1, 1]
    snap_w = AutoModelForCausalLM.from_pretrained(snap).state_dict()
    final_w = AutoModelForCausalLM.from_pretrained(run / "teacher_rev" / "final").state_dict()
    assert any(not torch.equal(snap_w[k], final_w[k]) for k in snap_w)  # RL steps 3-4 moved the teacher
    for step, want in ((0, snap_w), (1, snap_w), (2, final_w), (3, final_w)):
        got = panels.at(step).models["teacher_rev"].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), step


def test_scheduled_snapshots_are_placed_and_checked_like_final_teachers(run: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """A snapshot teacher honours `teacher_device` and the stage's dtype, and its tokenizer is checked."""
    snap = AutoModelForCausalLM.from_pretrained(run / "teacher_rev" / "snapshots" / "step-0000002").state_dict()
    offloaded = TeacherSchedule(_staged_ctx(run, stage={"dtype": "bfloat16"}, teacher_device="cpu")).at(0)
    assert offloaded.compute_device == torch.device("cpu")  # kept home, moved to the student's device per call
    got = offloaded.models["teacher_rev"].state_dict()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, snap[k].to(torch.bfloat16)) for k, v in got.items())
    assert all(not p.requires_grad for m in offloaded.models.values() for p in m.parameters())
    resident = TeacherSchedule(_staged_ctx(run, teacher_device="same")).at(0)
    assert resident.compute_device is None
    assert all(p.dtype == torch.float32 for p in resident.models["teacher_rev"].parameters())

    # a student whose tokenizer differs from the snapshots' is refused before any scoring
    own = build_char_tokenizer(ALPHABET + "ABC")
    model = build_tiny_model(TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16),
                             len(own), own, 0)
    save_checkpoint(tmp_path / "other" / "final", model, own, {"stage": "other"})
    ctx = _staged_ctx(run)
    ctx = dataclasses.replace(ctx, init_path=str(tmp_path / "other" / "final"), stage_dir=tmp_path / "staged")
    with pytest.raises(PreflightError, match="teacher 'teacher_rev'.*step-0000002"):
        _run_staged_until_training(ctx, monkeypatch)


def test_resume_with_snapshots_is_exact(tmp_path: Path, monkeypatch) -> None:
    """Interrupted after its step-2 checkpoint, a teacher resumes to the same metrics, totals and snapshots."""
    text = recipe("").replace("steps: 4, batch_size: 2, group_size: 4, keep_every: 2",
                              "steps: 4, batch_size: 2, group_size: 4, keep_every: 1, checkpoint_every: 2")
    (tmp_path / "r.yaml").write_text(text)
    loaded = load_recipe(tmp_path / "r.yaml")
    run_recipe(loaded, tmp_path / "whole", Console(quiet=True))

    real, calls = rl_module.policy_loss, {"n": 0}

    def crash_on_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill after the step-2 checkpoint")
        return real(*args, **kwargs)

    monkeypatch.setattr(rl_module, "policy_loss", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(loaded, tmp_path / "cut", Console(quiet=True))
    assert (tmp_path / "cut" / "teacher_rev" / "checkpoints" / "step-0000002").exists()
    monkeypatch.setattr(rl_module, "policy_loss", real)
    run_recipe(loaded, tmp_path / "cut", Console(quiet=True))

    def rows(out: Path) -> list[dict]:
        lines = (out / "teacher_rev" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if not k.startswith("time")} for x in lines]

    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")
    assert [r["samples"] for r in rows(tmp_path / "cut")] == [8, 16, 24, 32, 32]
    for step in (1, 2, 3):
        name = f"snapshots/step-{step:07d}/model.safetensors"
        a = (tmp_path / "whole" / "teacher_rev" / name).read_bytes()
        assert (tmp_path / "cut" / "teacher_rev" / name).read_bytes() == a


@pytest.mark.parametrize(
    ("schedule", "teacher_keep", "key", "needle"),
    [
        ("[{until_step: 2, snapshot: 3}, {until_step: 4, snapshot: final}]", "keep_every: 2",
         "stages.staged.teacher_schedule.0.snapshot", "there is no step-3"),
        ("[{until_step: 2, snapshot: 2}, {until_step: 4, snapshot: final}]", "keep_every: 0",
         "stages.staged.teacher_schedule.0.snapshot", "keeps no snapshots (set `keep_every` on it)"),
        ("[{until_step: 2, snapshot: 2}, {until_step: 3, snapshot: final}]", "keep_every: 2",
         "stages.staged", "must end at until_step = steps (4), not 3"),
        ("[{until_step: 2, snapshot: final}, {until_step: 4, snapshot: 2}]", "keep_every: 2",
         "stages.staged", "earlier snapshots first"),
    ],
)
def test_bad_teacher_schedule_fails_in_one_line(tmp_path: Path, schedule, teacher_keep, key, needle) -> None:
    stage = "staged: " + MOPD % ("sft", "{reversal: teacher_rev, sorting: teacher_sort}", 4,
                                 f", teacher_schedule: {schedule}")
    path = tmp_path / "bad.yaml"
    path.write_text(recipe(stage + "\n").replace("keep_every: 2", teacher_keep))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and f": {key}:" in msg and msg.startswith(f"{path}:"), msg


class _TrainingStarted(Exception):
    pass


def _run_staged_until_training(ctx: ResolvedStage, monkeypatch) -> list[dict[str, str]]:
    """Run the `staged` stage up to its first policy step; returns the teacher loads made up to then (every
    teacher a MOPD stage scores with, final or a schedule phase's snapshot, is loaded by `teacher_panel`)."""
    loads: list[dict[str, str]] = []
    real = mopd_module.teacher_panel

    def recording(c, checkpoints):
        loads.append(dict(checkpoints))
        return real(c, checkpoints)

    def stop(*_a, **_k):
        raise _TrainingStarted

    monkeypatch.setattr(mopd_module, "teacher_panel", recording)
    monkeypatch.setattr(rl_module, "policy_loss", stop)
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)  # as the runner does
    with pytest.raises(_TrainingStarted):
        run_module.run_stage(ctx)
    return loads


def test_scheduled_stage_loads_each_teacher_once_and_preflights_the_first_phase(run: Path, tmp_path: Path,
                                                                                monkeypatch) -> None:
    """With a `teacher_schedule` the preflight measures the teachers step 0 distils from (the first phase's
    snapshots) and training goes on with that very panel: up to the first policy step each teacher is loaded once,
    with the preflight on or off, and no final teacher is loaded before its phase (README, `preflight`)."""
    preflight = load_recipe(run / "recipe.yaml").recipe.stages["staged"].preflight
    first_phase = {t: str(run / t / "snapshots" / "step-0000002") for t in ("teacher_rev", "teacher_sort")}
    for enabled in (True, False):
        ctx = _staged_ctx(run, stage={"preflight": preflight.model_copy(update={"enabled": enabled})})
        ctx = dataclasses.replace(ctx, stage_dir=tmp_path / f"staged-{enabled}", tokenizer=build_char_tokenizer(ALPHABET))
        assert _run_staged_until_training(ctx, monkeypatch) == [first_phase]
        assert (ctx.stage_dir / "preflight.json").exists() == enabled


def test_a_late_phase_teacher_with_another_tokenizer_fails_before_the_first_step(run: Path, tmp_path: Path,
                                                                                monkeypatch) -> None:
    """Phase 0 scores with a good snapshot; the final teacher (phase 1) has another tokenizer: refused at the
    start, with the preflight off, instead of halfway through the stage."""
    import shutil

    own = build_char_tokenizer(ALPHABET + "ABC")
    model = build_tiny_model(TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16),
                             len(own), own, 0)
    save_checkpoint(tmp_path / "teacher_rev" / "final", model, own, {"stage": "teacher_rev"})
    shutil.copytree(run / "teacher_rev" / "snapshots", tmp_path / "teacher_rev" / "snapshots")
    preflight = load_recipe(run / "recipe.yaml").recipe.stages["staged"].preflight
    ctx = _staged_ctx(run, stage={"preflight": preflight.model_copy(update={"enabled": False})})
    ctx = dataclasses.replace(ctx, stage_dir=tmp_path / "staged", tokenizer=build_char_tokenizer(ALPHABET))
    moved = str(tmp_path / "teacher_rev" / "final")
    phases = tuple(teacher_checkpoint(moved, ph.snapshot) for ph in ctx.settings.teacher_schedule)
    ctx.teachers["teacher_rev"] = replace(ctx.teachers["teacher_rev"], checkpoint=moved, phases=phases)
    with pytest.raises(PreflightError, match=r"teacher 'teacher_rev' \(.*teacher_rev/final\)"):
        _run_staged_until_training(ctx, monkeypatch)
