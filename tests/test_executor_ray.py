"""`--executor ray` on a local Ray instance: the same numbers as the local executor, independent stages at the
same time, a rerun that skips everything, and a failed stage that stops only its dependants."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from mopd.core.errors import StageError
from mopd.execution.progress import logged_step
from mopd.execution.runner import run_recipe
from mopd.recipe.load import load_recipe

from .conftest import MINI_RECIPE

ray = pytest.importorskip("ray")

TEACHERS = ("teacher_add", "teacher_rev", "teacher_sort")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    """The mini recipe run by both executors at one torch thread (stages at the default 1 CPU each)."""
    root = tmp_path_factory.mktemp("executors")
    (root / "mini.yaml").write_text(MINI_RECIPE)
    loaded = load_recipe(root / "mini.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.time()
        run_recipe(loaded, root / "local", executor="local")
        (root / "local.seconds").write_text(f"{time.time() - started}")
    finally:
        torch.set_num_threads(threads)
    console = Console(file=io.StringIO(), width=200)
    started = time.time()
    run_recipe(loaded, root / "ray", console, executor="ray", threads=1)
    (root / "ray.seconds").write_text(f"{time.time() - started}")  # the run as the caller timed it
    (root / "ray.log").write_text(console.file.getvalue())
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


def test_the_run_wall_time_is_the_time_the_run_took(runs):
    """run.json's `wall_seconds` lies between the span of its stages (first start to last end) and the time the
    caller measured around the whole run (its Ray set-up and report included), whichever executor ran it; under
    Ray, where two teachers ran at the same time, that span is shorter than the sum of the stage times it was."""
    for run in ("ray", "local"):
        info = json.loads((runs / run / "run.json").read_text())
        stages = info["stages"].values()
        span = max(v["ended_at"] for v in stages) - min(v["started_at"] for v in stages)
        assert span - 0.01 <= info["wall_seconds"] <= float((runs / f"{run}.seconds").read_text()) + 0.01
    ray_stages = _stages(runs / "ray").values()
    assert (max(v["ended_at"] for v in ray_stages) - min(v["started_at"] for v in ray_stages)
            < sum(v["wall_seconds"] for v in ray_stages))


def test_the_driver_shows_each_running_stage_on_its_own_lines(runs):
    """Off a terminal: plain lines, each naming one stage, read by the driver from the stage's metrics log
    (the workers print none), each stage's last one at its last step."""
    log = (runs / "ray.log").read_text()
    assert "pid=" not in log  # nothing forwarded from a worker
    steps = {"base": 6, "sft": 3, "teacher_add": 2, "teacher_rev": 2, "teacher_sort": 2, "student": 4}
    for stage, total in steps.items():
        lines = [x for x in log.splitlines() if x.startswith(f"{stage}  step ")]
        assert lines and lines[-1].startswith(f"{stage}  step {total}/{total} (100%)"), (stage, log)


def test_logged_step_reads_the_last_whole_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert logged_step(path) is None
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25, "note": "x"}\n{"step": 3, "lo')
    assert logged_step(path) == (2, {"step": 2, "loss": 0.25})


def test_a_rerun_skips_every_stage(runs):
    loaded = load_recipe(runs / "mini.yaml")
    before = _stages(runs / "ray")
    run_recipe(loaded, runs / "ray", executor="ray", threads=1)
    after = _stages(runs / "ray")
    assert {n: v["status"] for n, v in after.items()} == dict.fromkeys(before, "cached")
    assert all(after[n]["started_at"] == before[n]["started_at"] for n in before)


def _broken_teacher(runs: Path, run: str, tmp_path: Path):
    """The mini recipe with teacher_rev starting from a copy of `run`'s sft whose weights are broken after the
    recipe loaded (the load-time checks pass; the stage fails when it loads them)."""
    external = tmp_path / "broken_start"
    shutil.copytree(runs / run / "sft" / "final", external)
    text = (runs / "mini.yaml").read_text()
    text = text.replace("    init: sft\n    domains: [reversal]", f"    init: {external}\n    domains: [reversal]")
    (tmp_path / "mini.yaml").write_text(text)
    loaded = load_recipe(tmp_path / "mini.yaml")
    (external / "model.safetensors").write_bytes(b"not a safetensors file")
    return loaded


def test_a_failed_stage_stops_its_dependants_only(runs, tmp_path):
    """teacher_rev starts from an external checkpoint whose weights are broken after the recipe loaded: it
    fails in its worker, the student (which needs it) does not run, the other teachers finish."""
    loaded = _broken_teacher(runs, "ray", tmp_path)
    with pytest.raises(StageError) as err:
        run_recipe(loaded, tmp_path / "run", executor="ray", threads=1)
    [line] = str(err.value).splitlines()
    assert line.startswith("stage 'teacher_rev' failed: ") and line.endswith("not run: student")
    stages = _stages(tmp_path / "run")
    assert {"base", "sft", "teacher_add", "teacher_sort"} <= stages.keys()
    assert "teacher_rev" not in stages and "student" not in stages


def test_the_local_executor_also_stops_the_dependants_only(runs, tmp_path):
    """The same broken teacher on the local executor: the stages after it in order that do not need it still
    run (teacher_sort trains after teacher_rev failed), and the error is the same line."""
    loaded = _broken_teacher(runs, "local", tmp_path)
    assert loaded.order.index("teacher_rev") < loaded.order.index("teacher_sort")
    shutil.copytree(runs / "local", tmp_path / "run", symlinks=True)
    for stage in ("teacher_rev", "teacher_sort", "student"):
        shutil.rmtree(tmp_path / "run" / stage)
    with pytest.raises(StageError) as err:
        run_recipe(loaded, tmp_path / "run", Console(file=io.StringIO()), executor="local", threads=1)
    [line] = str(err.value).splitlines()
    assert line.startswith("stage 'teacher_rev' failed: ") and line.endswith("not run: student")
    stages = _stages(tmp_path / "run")
    assert stages["teacher_sort"]["status"] != "cached" and (tmp_path / "run" / "teacher_sort" / "final").is_dir()
    assert "teacher_rev" not in stages and not (tmp_path / "run" / "student").exists()


def test_a_missing_address_is_one_line_before_compute(tmp_path, mini_recipe):
    loaded = load_recipe(mini_recipe)
    with pytest.raises(StageError, match=r"--address 127\.0\.0\.1:9: no Ray head answers there"):
        run_recipe(loaded, tmp_path / "run", executor="ray", address="127.0.0.1:9")
    assert not (tmp_path / "run").exists()


def test_the_address_check_lets_a_ray_head_through(ray_local):
    """The question `--address` asks before `ray.init` (its cluster id) is answered by a real head; a port
    that is not one is refused (tests/test_silences.py)."""
    from mopd.execution.ray_address import check_address

    check_address(ray_local, ray_local.get_runtime_context().gcs_address)


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


LONG = """\
name: retry
seed: 0
domains: [addition]
eval: {size: 4, max_new_tokens: 4}
stages:
  STAGE:
    kind: pretrain
    model: {hidden_size: 16, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 32}
    steps: 60
    batch_size: 4
    checkpoint_every: 5
"""


def _kill_stage_worker(stage: str, stage_dir: Path, killed: list[float], stop) -> None:
    """Once the stage saved its first checkpoint, SIGKILL the Ray worker running it (its process title is
    `ray::mopd:<stage>`; the stage name is unique to this test)."""
    import os
    import signal
    import time

    import psutil

    while not stop.is_set():
        if list((stage_dir / "checkpoints").glob("step-*")):
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if (proc.info["cmdline"] or [""])[0].strip() == f"ray::mopd:{stage}":
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(time.time())
                    return
        time.sleep(0.01)


@pytest.fixture(scope="module")
def long_local(tmp_path_factory):
    """The one-stage LONG recipe (a stage name unique to this session: its worker's process title) run by the
    local executor at one torch thread: the uninterrupted reference of the kill tests."""
    import uuid

    root = tmp_path_factory.mktemp("long")
    stage = f"long_{uuid.uuid4().hex[:8]}"
    _local_reference(root, LONG.replace("STAGE", stage))
    return root, stage


def _local_reference(root: Path, recipe: str) -> None:
    """`recipe` written to root/r.yaml and run by the local executor at one torch thread into root/local."""
    (root / "r.yaml").write_text(recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_recipe(load_recipe(root / "r.yaml"), root / "local")
    finally:
        torch.set_num_threads(threads)


def _same_as_local(run: Path, local: Path, stage: str) -> None:
    """The stage's final weights and metrics records (wall time aside) equal the local run's."""
    a = load_file(local / stage / "final" / "model.safetensors")
    b = load_file(run / stage / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def records(r: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(x).items() if not k.startswith("time")}
                for x in (r / stage / "metrics.jsonl").read_text().splitlines()]

    assert records(run) == records(local)


def test_a_killed_stage_worker_is_retried_and_resumes_from_its_checkpoint(tmp_path, long_local, ray_local):
    """The stage's worker process dies after its first checkpoint: Ray runs the task again, the stage resumes
    from that checkpoint (its wall time counts the checkpointed seconds), and finishes with the weights and
    metrics of an uninterrupted local run."""
    import threading

    root, stage = long_local
    loaded = load_recipe(root / "r.yaml")
    killed: list[float] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_stage_worker, args=(stage, tmp_path / "ray" / stage, killed, stop))
    killer.start()
    try:
        run_recipe(loaded, tmp_path / "ray", executor="ray", threads=1)
    finally:
        stop.set()
        killer.join()
    assert killed, "the stage finished before its worker could be killed"
    info = _stages(tmp_path / "ray")[stage]
    assert info["started_at"] > killed[0]  # the entry is the retried attempt's
    assert info["wall_seconds"] > info["ended_at"] - info["started_at"]  # ... which resumed from a checkpoint
    _same_as_local(tmp_path / "ray", root / "local", stage)


@pytest.mark.slow
def test_a_killed_driver_resumes_with_the_same_command(tmp_path):
    """`mopd run --executor ray` SIGKILLed with its process group (the driver and the Ray instance it started)
    after the stage's first checkpoint. Its stage worker lives on for a few seconds (Ray ends a dead driver's
    workers late), holding the stage directory's lock, so a rerun's worker would wait for it; the same command
    then resumes the stage from what it left and ends with an uninterrupted run's weights and metrics."""
    import subprocess
    import sys

    from .test_kill_resume import kill_after_first_checkpoint

    stage = "long_driver"
    _local_reference(tmp_path, LONG.replace("STAGE", stage).replace("steps: 60", "steps: 1500")
                     .replace("checkpoint_every: 5", "checkpoint_every: 25"))
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "mopd", "run", str(tmp_path / "r.yaml"), "--out", str(out), "--executor", "ray",
           "--threads", "1"]
    kill_after_first_checkpoint(cmd, out / stage, poll=0.02, settle=0.0)
    from mopd.execution.run_lock import RunLockedError, stage_lock

    with pytest.raises(RunLockedError, match="is still writing"), stage_lock(out, stage, wait_s=0):
        pass  # the killed run's stage worker outlives its driver, and holds the stage's directory
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    info = _stages(out)[stage]
    assert info["status"] != "cached"  # the killed run had not finished the stage: this one did, resuming
    assert info["wall_seconds"] > info["ended_at"] - info["started_at"]
    _same_as_local(out, tmp_path / "local", stage)


@pytest.mark.parametrize("which", ["stage", "run"])
def test_a_directory_has_one_writer(tmp_path, which):
    """A second holder of a stage's lock (or, waiting as a sweep point's Ray task does, of a run directory's) waits
    for the first to let go, and past its wait says who holds it; `mopd run`'s own run lock does not wait."""
    import threading

    from mopd.execution.run_lock import RunLockedError, run_lock, stage_lock

    def lock(wait_s: float):
        return stage_lock(tmp_path, "s", wait_s) if which == "stage" else run_lock(tmp_path, wait_s)

    held = (rf"stage 's': process {os.getpid()} is still writing .* after 0 s" if which == "stage"
            else rf"another mopd run \(process {os.getpid()}\) is using this run directory")
    order: list[str] = []

    def second() -> None:
        with lock(10):
            order.append("second")

    with lock(0):
        with pytest.raises(RunLockedError, match=held), lock(0.3):
            pass
        later = threading.Thread(target=second)
        later.start()
        time.sleep(0.5)
        order.append("first done")
    later.join(timeout=10)
    assert order == ["first done", "second"]
