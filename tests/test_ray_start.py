"""What the Ray executor does as it starts (issue 36): every node probes the run directory, and a node that
cannot see it is one line before any stage; the workers of the stages that can run at once are prestarted."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import pytest
from rich.console import Console

from mopd.core.errors import StageError
from mopd.execution import ray_executor
from mopd.execution.prestart import widest_moment
from mopd.execution.runner import run_recipe
from mopd.execution.shared_dir import check_shared_dir, probe_node
from mopd.recipe.load import load_recipe

from .conftest import MINI_RECIPE


def _local_disk(elsewhere: Path):
    """A probe as a node runs it whose disk at the run directory's path is its own (`elsewhere`): it neither sees
    the driver's probe file nor writes where the driver reads."""
    return lambda directory, token, node: probe_node(str(elsewhere), token, node)


def test_every_node_sees_the_run_directory_and_the_probe_leaves_nothing(tmp_path, ray_local):
    (tmp_path / "kept.txt").write_text("saved")
    assert check_shared_dir(ray_local, tmp_path) == len([n for n in ray_local.nodes() if n["Alive"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]


def test_a_node_that_cannot_see_the_run_directory_is_one_line_naming_it(tmp_path, ray_local):
    elsewhere, run = tmp_path / "node_local_disk", tmp_path / "run"
    elsewhere.mkdir()
    run.mkdir()
    [node] = [n for n in ray_local.nodes() if n["Alive"]]
    with pytest.raises(StageError) as err:
        check_shared_dir(ray_local, run, probe=_local_disk(elsewhere))
    [line] = str(err.value).splitlines()
    assert f"Ray node {node['NodeManagerAddress']} (node id {node['NodeID'][:12]})" in line
    assert "cannot read the probe file the driver wrote there" in line and "filesystem every node sees" in line
    assert not list(run.iterdir()) and not list(elsewhere.iterdir())  # no probe file left on either disk


def test_the_ray_executor_checks_the_run_directory_before_any_stage(tmp_path, ray_local, monkeypatch, mini_recipe):
    """Through `mopd run --executor ray`: the one line, and no stage started (nothing written but the recipe's
    copy and the lock)."""
    elsewhere = tmp_path / "node_local_disk"
    elsewhere.mkdir()
    monkeypatch.setattr(ray_executor, "check_shared_dir",
                        functools.partial(check_shared_dir, probe=_local_disk(elsewhere)))
    with pytest.raises(StageError, match=r"^run directory .*/run: Ray node .* cannot read the probe file"):
        run_recipe(load_recipe(mini_recipe), tmp_path / "run", Console(file=io.StringIO()), executor="ray")
    assert not [p for p in (tmp_path / "run").iterdir() if p.is_dir()]
    assert not (tmp_path / "run" / "run.json").exists()


def _recipe(tmp_path: Path, text: str):
    (tmp_path / "r.yaml").write_text(text)
    return load_recipe(tmp_path / "r.yaml")


def test_the_widest_moment_is_the_largest_generation_the_cluster_holds(tmp_path):
    """The mini recipe: base, sft, then three teachers together, then the student."""
    loaded = _recipe(tmp_path, MINI_RECIPE)
    assert widest_moment(loaded, 8) == [1.0, 1.0, 1.0]
    assert widest_moment(loaded, 2) == [1.0, 1.0]  # two teachers at a time on two CPUs
    assert widest_moment(loaded, 1) == [1.0]


def test_the_widest_moment_counts_learner_ranks_and_leaves_out_gpu_stages(tmp_path):
    text = MINI_RECIPE.replace("    domains: [sorting]\n", "    domains: [sorting]\n    resources: {gpus: 1}\n")
    text += "    learner: {workers: 4}\n    resources: {cpus: 0.5}\n"  # the student: 4 ranks of half a CPU
    loaded = _recipe(tmp_path, text)
    assert widest_moment(loaded, 8) == [0.5, 0.5, 0.5, 0.5]  # the student's ranks, not the 2 CPU teachers
    assert widest_moment(loaded, 1.5) == [0.5, 0.5, 0.5]  # three ranks fit, one teacher would


def test_a_sweep_on_ray_checks_its_run_directories_before_any_point(tmp_path, ray_local, monkeypatch, mini_recipe):
    """`mopd sweep --executor ray`: its points' run directories are written by workers too; the same line, exit
    2, and no point started."""
    from typer.testing import CliRunner

    from mopd.cli import app
    from mopd.experiments import variants_ray

    elsewhere = tmp_path / "node_local_disk"
    elsewhere.mkdir()
    monkeypatch.setattr(variants_ray, "check_shared_dir",
                        functools.partial(check_shared_dir, probe=_local_disk(elsewhere)))
    res = CliRunner().invoke(app, ["sweep", str(mini_recipe), "--set", "student.lr=1e-3,2e-3", "--executor", "ray",
                                   "--out", str(tmp_path / "sweep")])
    assert res.exit_code == 2, res.output
    assert "cannot read the probe file the driver wrote there" in res.output
    assert not any(p.is_dir() for p in (tmp_path / "sweep").rglob("*"))  # no point's directory
