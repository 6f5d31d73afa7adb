"""`mopd sweep` / `mopd compare --seeds` with `--executor ray` on the session's local Ray instance: variants that
share nothing run at the same time, a point waits for the variant that trains its parents (trained once, then
linked), the numbers are those of the local executor, a failed point is a hole in the table, and every mistake
in the executor options is one line before any compute."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mopd.cli import app

from .test_compare_seeds import PINNED
from .test_sweep import MINI

pytest.importorskip("ray")

SHARED = ("base", "sft", "teacher_rev", "teacher_sort")


def _invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _stages(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())["stages"]


def _span(run_dir: Path, stages: tuple[str, ...]) -> tuple[float, float]:
    info = _stages(run_dir)
    return min(info[s]["started_at"] for s in stages), max(info[s]["ended_at"] for s in stages)


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(stage_dir / "final" / "model.safetensors")


def test_sweep_points_run_in_parallel_and_parents_train_once(tmp_path: Path, ray_warm) -> None:
    path = tmp_path / "mini.yaml"
    path.write_text(MINI)
    out, local = tmp_path / "ray", tmp_path / "local"
    res = _invoke("sweep", path, "--set", "student.lr=1e-3,2e-3", "--seeds", "2", "--threads", "1",
                  "--executor", "ray", "--out", out)
    assert res.exit_code == 0, res.output
    assert "student.lr=1e-3/seed-0: started on Ray (1 CPU, 0 GPU)" in res.output
    every = (*SHARED, "student")
    for seed in ("seed-0", "seed-1"):
        first, second = out / "student.lr=1e-3" / seed, out / "student.lr=2e-3" / seed
        assert {s["status"] for s in _stages(first).values()} == {"ran"}
        assert {n: s["status"] for n, s in _stages(second).items()} == {**dict.fromkeys(SHARED, "cached"),
                                                                       "student": "ran"}
        assert all((second / s).is_symlink() for s in SHARED)  # trained once, by the seed's first point
        assert _stages(second)["student"]["started_at"] >= _span(first, SHARED)[1]  # it waited for them
    # the two seeds share nothing: their first points ran at the same time (two CPUs, one each)
    a, b = (_span(out / "student.lr=1e-3" / s, every) for s in ("seed-0", "seed-1"))
    assert a[0] < b[1] and b[0] < a[1], (a, b)
    assert len(json.loads((out / "sweep.json").read_text())["points"]) == 2

    # the local executor at one thread: the same weights and evaluations, point for point (seed 0)
    res = _invoke("sweep", path, "--set", "student.lr=1e-3,2e-3", "--threads", "1", "--out", local)
    assert res.exit_code == 0, res.output
    for point in ("student.lr=1e-3", "student.lr=2e-3"):
        here, there = _weights(local / point / "student"), _weights(out / point / "seed-0" / "student")
        assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here), point
        evals = [json.loads((d / "student" / "final" / "mopd.json").read_text())["metrics"]["eval"]
                 for d in (local / point, out / point / "seed-0")]
        assert evals[0] == evals[1]


def test_a_point_starts_once_its_parents_are_done_not_the_first_points_student(tmp_path: Path, ray_local) -> None:
    """One seed, two points: the second point is started as soon as the first point's run records the shared
    parents done, while the first point's student still trains (its 100 steps take 200 polls or more), and it
    uses those parents (linked, not trained again)."""
    path, out = tmp_path / "mini.yaml", tmp_path / "sweep"
    path.write_text(MINI.replace("steps: 2,\n", "steps: 100,\n", 1))
    res = _invoke("sweep", path, "--set", "student.lr=1e-3,2e-3", "--threads", "1", "--executor", "ray",
                  "--out", out)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    started = lines.index("student.lr=2e-3: started on Ray (1 CPU, 0 GPU)")
    finished = next(i for i, line in enumerate(lines) if line.startswith("student.lr=1e-3: finished"))
    assert started < finished, res.output
    first, second = (_stages(out / f"student.lr={lr}") for lr in ("1e-3", "2e-3"))
    assert {first[s]["status"] for s in SHARED} == {"ran"} and {second[s]["status"] for s in SHARED} == {"cached"}
    assert second["student"]["started_at"] >= max(first[s]["ended_at"] for s in SHARED)


def test_a_failed_point_on_ray_is_a_hole_in_the_table(tmp_path: Path, ray_local) -> None:
    path, out = tmp_path / "mini.yaml", tmp_path / "sweep"
    path.write_text(MINI)
    res = _invoke("sweep", path, "--set", "student.preflight={min_teacher_gain: 0.99},{kl_warn: 5.0}",
                  "--threads", "1", "--executor", "ray", "--out", out)
    assert res.exit_code == 2, res.output
    [gated] = [p for p in out.iterdir() if "min_teacher_gain" in p.name]
    [other] = [p for p in out.iterdir() if "kl_warn" in p.name]
    errors = res.output[res.output.index("error:"):].replace("\n", " ")
    assert f"error: {gated.name}: stage 'student': teachers must beat the start" in errors
    assert not (gated / "student" / "final").exists() and (other / "student" / "final").is_dir()
    assert len(json.loads((out / "sweep.json").read_text())["points"]) == 2


def test_compare_seeds_on_ray_wait_for_pinned_stages(tmp_path: Path, ray_local) -> None:
    """Seed 1 shares the pinned start and teachers with seed 0: it starts when seed 0 has trained them."""
    path, out = tmp_path / "mini.yaml", tmp_path / "out"
    path.write_text(PINNED)
    res = _invoke("compare", path, "--executor", "ray", "--threads", "1", "--out", out)
    assert res.exit_code == 0, res.output
    s0, s1 = out / "seed-0", out / "seed-1"
    assert all((s1 / s).is_symlink() and (s1 / s).resolve() == (s0 / s).resolve() for s in SHARED)
    assert {_stages(s1)[s]["status"] for s in SHARED} == {"cached"} and _stages(s1)["student"]["status"] == "ran"
    assert json.loads((out / "compare.json").read_text())["intervals"]["seeds"] == 2


def test_compare_with_one_seed_on_ray_runs_its_methods_as_ray_tasks(tmp_path: Path, ray_local) -> None:
    path, out = tmp_path / "mini.yaml", tmp_path / "out"
    path.write_text(PINNED.replace("seeds: 2\n", "", 1))
    res = _invoke("compare", path, "--executor", "ray", "--threads", "1", "--out", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["executor"] == "ray"
    assert set(json.loads((out / "compare.json").read_text())["methods"]) == {"MOPD", "Average merge"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--executor", "dask"], "--executor dask: expected local or ray"),
        (["--address", "127.0.0.1:1"], "--address needs --executor ray"),
        (["--executor", "ray", "--address", "127.0.0.1:1"], "--address 127.0.0.1:1: no Ray head answers there"),
    ],
)
def test_executor_mistakes_are_one_line_before_any_compute(tmp_path: Path, args: list[str], needle: str) -> None:
    path, out = tmp_path / "mini.yaml", tmp_path / "out"
    path.write_text(MINI)
    for command in (["sweep", path, "--set", "student.lr=1e-3"], ["compare", path.with_name("cmp.yaml")]):
        path.with_name("cmp.yaml").write_text(PINNED)
        res = _invoke(*command, *args, "--out", out)
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output
        assert not out.exists()


def test_without_ray_the_ray_executor_is_one_line(tmp_path: Path, monkeypatch) -> None:
    path, out = tmp_path / "mini.yaml", tmp_path / "out"
    path.write_text(MINI)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    res = _invoke("sweep", path, "--set", "student.lr=1e-3", "--executor", "ray", "--out", out)
    assert res.exit_code == 2 and "--executor ray needs Ray, which does not import here" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()
