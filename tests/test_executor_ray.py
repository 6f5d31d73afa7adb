"""`--executor ray` on a local Ray instance: the same numbers as the local executor, independent stages at the
same time, a rerun that skips everything, and a failed stage that stops only its dependants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mopd.core.errors import StageError
from mopd.recipe.load import load_recipe
from mopd.recipe.runner import run_recipe

from .conftest import MINI_RECIPE

ray = pytest.importorskip("ray")

TEACHERS = ("teacher_add", "teacher_rev", "teacher_sort")


def _warm(_: int) -> int:
    import mopd.recipe.executor_ray  # noqa: F401  the worker's imports (torch, transformers), once
    return 0


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session, started only by the tests that ask for it, with its two workers
    already importing mopd, so that short stages overlap instead of waiting for a worker to start."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    warm = ray.remote(num_cpus=1)(_warm)
    ray.get([warm.remote(i) for i in range(2)])
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    """The mini recipe run by both executors at one torch thread (stages at the default 1 CPU each)."""
    root = tmp_path_factory.mktemp("executors")
    (root / "mini.yaml").write_text(MINI_RECIPE)
    loaded = load_recipe(root / "mini.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_recipe(loaded, root / "local", executor="local")
    finally:
        torch.set_num_threads(threads)
    run_recipe(loaded, root / "ray", executor="ray", threads=1)
    return root


def _stages(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())["stages"]


def _evals(run: Path, stage: str) -> list:
    records = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [r["eval"] for r in records if "eval" in r]


def test_ray_gives_the_local_numbers(runs):
    assert json.loads((runs / "ray" / "run.json").read_text())["executor"] == "ray"
    for stage in ("base", "sft", *TEACHERS, "student"):
        assert _stages(runs / "ray")[stage]["identity"] == _stages(runs / "local")[stage]["identity"]
        assert _evals(runs / "ray", stage) == _evals(runs / "local", stage), stage
    local = load_file(runs / "local" / "student" / "final" / "model.safetensors")
    remote = load_file(runs / "ray" / "student" / "final" / "model.safetensors")
    assert local.keys() == remote.keys()
    assert all(torch.equal(local[k], remote[k]) for k in local)


def test_independent_teachers_run_at_the_same_time(runs):
    stages = _stages(runs / "ray")
    assert all(stages[n]["status"] == "ran" for n in stages)
    starts = [stages[t]["started_at"] for t in TEACHERS]
    ends = [stages[t]["ended_at"] for t in TEACHERS]
    first, second, _ = sorted(TEACHERS, key=lambda t: stages[t]["started_at"])
    # two CPUs, one per teacher: two teachers run at one moment, the third when one of them is done
    assert stages[second]["started_at"] < stages[first]["ended_at"], stages
    assert min(starts) >= stages["sft"]["ended_at"] and stages["student"]["started_at"] >= max(ends)


def test_a_rerun_skips_every_stage(runs):
    loaded = load_recipe(runs / "mini.yaml")
    before = _stages(runs / "ray")
    run_recipe(loaded, runs / "ray", executor="ray", threads=1)
    after = _stages(runs / "ray")
    assert {n: v["status"] for n, v in after.items()} == dict.fromkeys(before, "cached")
    assert all(after[n]["started_at"] == before[n]["started_at"] for n in before)


def test_a_failed_stage_stops_its_dependants_only(runs, tmp_path):
    """teacher_rev starts from an external checkpoint whose weights are broken after the recipe loaded: it
    fails in its worker, the student (which needs it) does not run, the other teachers finish."""
    external = tmp_path / "broken_start"
    shutil.copytree(runs / "ray" / "sft" / "final", external)
    text = (runs / "mini.yaml").read_text()
    text = text.replace("    init: sft\n    domains: [reversal]", f"    init: {external}\n    domains: [reversal]")
    (tmp_path / "mini.yaml").write_text(text)
    loaded = load_recipe(tmp_path / "mini.yaml")
    (external / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StageError) as err:
        run_recipe(loaded, tmp_path / "run", executor="ray", threads=1)
    [line] = str(err.value).splitlines()
    assert line.startswith("stage 'teacher_rev' failed: ") and line.endswith("not run: student")
    stages = _stages(tmp_path / "run")
    assert {"base", "sft", "teacher_add", "teacher_sort"} <= stages.keys()
    assert "teacher_rev" not in stages and "student" not in stages


def test_a_missing_address_is_one_line_before_compute(tmp_path, mini_recipe):
    loaded = load_recipe(mini_recipe)
    with pytest.raises(StageError, match=r"--address 127\.0\.0\.1:9: no Ray head answers there"):
        run_recipe(loaded, tmp_path / "run", executor="ray", address="127.0.0.1:9")
    assert not (tmp_path / "run").exists()


def test_too_many_gpus_is_one_line_before_compute(tmp_path, ray_local):
    (tmp_path / "mini.yaml").write_text(MINI_RECIPE.replace("    steps: 3\n", "    steps: 3\n    resources: {gpus: 4}\n"))
    with pytest.raises(StageError, match=r"stage 'sft': resources ask for 4 GPUs; the Ray cluster has 0"):
        run_recipe(load_recipe(tmp_path / "mini.yaml"), tmp_path / "run", executor="ray")
    assert not (tmp_path / "run").exists()


def test_without_ray_the_executor_names_the_extra(monkeypatch, tmp_path, mini_recipe):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(StageError, match=r"pip install 'mopd\[ray\]'"):
        run_recipe(load_recipe(mini_recipe), tmp_path / "run", executor="ray")
