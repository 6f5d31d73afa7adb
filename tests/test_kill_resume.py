"""kill -9 during the MOPD stage, then the same command again: finished stages are not redone, the MOPD stage
resumes from its last checkpoint, and a valid report is written. A LoRA MOPD stage cut after a checkpoint resumes
to the same metrics and weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mopd.execution.runner import run_recipe
from mopd.models.lora import is_lora
from mopd.recipe.load import load_recipe
from mopd.stages import rl as rl_module

from .conftest import MINI_RECIPE
from .mini_compare import recipe


def kill_after_first_checkpoint(cmd: list[str], stage: Path, *, poll: float, settle: float) -> None:
    """Start `cmd` (a `mopd run`) in its own process group, and SIGKILL the whole group `settle` seconds after
    `stage` wrote its first checkpoint; the stage must not have finished by then."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = stage / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not any(ckpts.glob("step-*")):
        assert proc.poll() is None, f"the run ended before {stage.name!r} wrote a checkpoint"
        time.sleep(poll)
    time.sleep(settle)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (stage / "final").exists(), f"killed too late: {stage.name!r} had finished"


@pytest.mark.slow
def test_kill_9_during_mopd_then_rerun(tmp_path: Path) -> None:
    data = yaml.safe_load(MINI_RECIPE)
    data["stages"]["student"].update(steps=60, checkpoint_every=5)
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mopd", "run", str(recipe), "--out", str(out)]
    ckpts = out / "student" / "checkpoints"
    kill_after_first_checkpoint(cmd, out / "student", poll=0.05, settle=0.3)
    finished = ["base", "sft", "teacher_add", "teacher_rev", "teacher_sort"]
    mtimes = {s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns for s in finished}
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    metrics = out / "student" / "metrics.jsonl"

    def lines_upto(step: int) -> list[str]:
        return [x for x in metrics.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]

    before_kill = lines_upto(killed_at)
    ckpt_lineage = json.loads((ckpts / f"step-{killed_at:07d}" / "mopd.json").read_text())
    trained_before_kill = ckpt_lineage["metrics"]["elapsed_seconds"]

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert {s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns for s in finished} == mtimes
    run = json.loads((out / "run.json").read_text())
    assert [run["stages"][s]["status"] for s in finished] == ["cached"] * 5
    assert run["stages"]["student"]["status"] == "ran"
    steps = [json.loads(x)["step"] for x in (out / "student" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 61)), "each step logged exactly once across the kill and the resume"
    assert killed_at >= 5
    # resumed, not restarted: the steps up to the checkpoint were not recomputed (their lines, with their
    # wall-clock times, are untouched)
    assert lines_upto(killed_at) == before_kill and len(before_kill) == killed_at
    # the stage's clock goes on across the resume: its metrics' time axis does not restart at zero, and the
    # stage's wall time (what the comparison table charges) includes the time before the kill
    times = [json.loads(x)["time"] for x in (out / "student" / "metrics.jsonl").read_text().splitlines()
             if "time" in json.loads(x)]
    assert times == sorted(times) and times[killed_at] >= trained_before_kill > 0
    assert run["stages"]["student"]["wall_seconds"] > trained_before_kill
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["domains"]) == {"addition", "reversal", "sorting"}
    assert (out / "report.md").read_text().count("| addition |") >= 1


LORA_STUDENT = (
    "student: {kind: mopd, init: sft, teachers: {reversal: teacher_rev, sorting: teacher_sort}, steps: 4, "
    "batch_size: 2, group_size: 2, lr: 0.01, checkpoint_every: 2, "
    "lora: {r: 4, alpha: 8, dropout: 0.3, target_modules: [q_proj, v_proj]}}\n"
)


def test_lora_stage_cut_after_a_checkpoint_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    """Cut after its step-2 checkpoint, a LoRA MOPD stage resumes (starting model + saved adapter + optimizer and
    RNG state; dropout > 0 draws from the global generator) to the uninterrupted run's metrics, adapter and merged
    weights; the base weights stay those of its `init`."""
    pytest.importorskip("peft")
    (tmp_path / "r.yaml").write_text(recipe(LORA_STUDENT))
    loaded = load_recipe(tmp_path / "r.yaml")
    run_recipe(loaded, tmp_path / "whole", Console(quiet=True))

    real, calls = rl_module.policy_loss, {"lora": 0}

    def crash_on_third_lora_step(model, *args, **kwargs):
        calls["lora"] += is_lora(model)  # teacher (RLVR) stages train full models: only the student counts
        if calls["lora"] == 3:
            raise KeyboardInterrupt("simulated kill after the step-2 checkpoint")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(rl_module, "policy_loss", crash_on_third_lora_step)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(loaded, tmp_path / "cut", Console(quiet=True))
    cut = tmp_path / "cut" / "student"
    ckpt = cut / "checkpoints" / "step-0000002"
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists() and (ckpt / "trainer_state.pt").exists()
    assert not (cut / "final").exists()
    before = (cut / "metrics.jsonl").read_text().splitlines()
    monkeypatch.setattr(rl_module, "policy_loss", real)
    run_recipe(loaded, tmp_path / "cut", Console(quiet=True))

    def rows(stage: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(x).items() if not k.startswith("time")}
                for x in (stage / "metrics.jsonl").read_text().splitlines()]

    whole = tmp_path / "whole" / "student"
    assert (cut / "metrics.jsonl").read_text().splitlines()[:2] == before[:2]  # resumed, not restarted
    assert rows(cut) == rows(whole) and [r["step"] for r in rows(cut)] == [1, 2, 3, 4, 4]
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert (cut / "final" / name).read_bytes() == (whole / "final" / name).read_bytes(), name
    assert not (cut / "checkpoints").exists()

    # the final checkpoint is a plain HF model: the init's weights plus the adapter's update, nothing else moved
    merged = AutoModelForCausalLM.from_pretrained(cut / "final")
    assert not hasattr(merged, "peft_config")
    base = load_file(tmp_path / "cut" / "sft" / "final" / "model.safetensors")
    adapter = load_file(cut / "final" / "adapter" / "adapter_model.safetensors")
    adapted = []
    for key, weight in merged.state_dict().items():
        if key not in base:  # the tied output head
            continue
        module = key.removesuffix(".weight")
        lora_a = adapter.get(f"base_model.model.{module}.lora_A.weight")
        if lora_a is None:
            assert torch.equal(weight, base[key]), key
            continue
        delta = adapter[f"base_model.model.{module}.lora_B.weight"] @ lora_a * (8 / 4)  # alpha / r
        assert delta.abs().max() > 0, key  # the adapter trained
        # the merge and this recomputation may round differently: each entry of B A sums r = 4 products (within
        # gamma(4) = 2.4e-7 of their magnitudes, 2 sum |b a| < 0.05 here), scaling by 2 is exact, the sum with the
        # weight rounds once (u |w|); rtol 1e-5 (~170 u) and atol 1e-6 cover both with room; a wrong scale or a
        # missing adapter moves an adapted weight by about |delta| (up to 0.03 here)
        torch.testing.assert_close(weight, base[key] + delta, rtol=1e-5, atol=1e-6)
        adapted.append(module.rsplit(".", 1)[-1])
    assert sorted(adapted) == ["q_proj", "v_proj"] and len(base) > len(adapted)
