"""kill -9 during the MOPD stage, then the same command again: finished stages are not redone, the MOPD stage
resumes from its last checkpoint, and a valid report is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import MINI_RECIPE


@pytest.mark.slow
def test_kill_9_during_mopd_then_rerun(tmp_path: Path) -> None:
    data = yaml.safe_load(MINI_RECIPE)
    data["stages"]["student"].update(steps=60, checkpoint_every=5)
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mopd", "run", str(recipe), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = out / "student" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not any(ckpts.glob("step-*")):
        assert proc.poll() is None, "the run ended before the MOPD stage wrote a checkpoint"
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "student" / "final").exists(), "killed too late: the MOPD stage had finished"
    finished = ["base", "sft", "teacher_add", "teacher_rev", "teacher_sort"]
    mtimes = {s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns for s in finished}
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    metrics = out / "student" / "metrics.jsonl"

    def lines_upto(step: int) -> list[str]:
        return [x for x in metrics.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]

    before_kill = lines_upto(killed_at)

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
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["domains"]) == {"addition", "reversal", "sorting"}
    assert (out / "report.md").read_text().count("| addition |") >= 1
