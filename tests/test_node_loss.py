"""Node loss on a simulated 3-node Ray cluster (issue 36): a node removed with the stage it runs, or with the
teacher actor or rollout worker it holds, costs time, not numbers. The cluster runs in a process of its own
(`tests/node_loss_cluster.py`, which says how): this session's shared Ray instance is another cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trials(tmp_path_factory) -> dict:
    """One trial of each kind (about a minute on a 2-core machine: the cluster's start, three Ray runs, and the
    restarts, each of which imports torch in a fresh worker)."""
    out = tmp_path_factory.mktemp("node_loss")
    done = subprocess.run([sys.executable, "-m", "tests.node_loss_cluster", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_a_stage_whose_node_is_lost_resumes_on_another_from_its_checkpoint(trials):
    [stage] = trials["stage"]
    assert stage["removed"]  # the node went while the stage ran, after its first checkpoint
    assert stage["resumed_from_checkpoint"]  # the retried attempt started after the removal, from a checkpoint
    assert stage["identical"]  # every metrics record and weight of an uninterrupted local run


def test_a_lost_teacher_actor_or_rollout_worker_is_restarted_elsewhere_with_the_same_numbers(trials):
    [actors] = trials["actors"]
    assert actors["removed"] == ["RolloutWorker", "TeacherWorker"]  # both nodes went while the student trained
    assert actors["restarted"]  # each came back as a new process on a node that was left
    assert actors["identical"]
