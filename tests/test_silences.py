"""Hangs and silences (issue 36): an `--address` that is not Ray, GPUs the local executor does not have, an actor
teacher without a working Ray, extras names lost to rich markup, and the run's wall time in run.json. Each is one
line before compute (or, for the markup, the text as written)."""

from __future__ import annotations

import http.server
import io
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from mopd.cli import app
from mopd.core.errors import StageError
from mopd.execution.local_executor import check_local_gpus, warn_line
from mopd.execution.ray_address import CONNECT_TIMEOUT_ENV, connect_timeout
from mopd.execution.runner import busy_seconds, run_recipe
from mopd.recipe.load import load_recipe

from .test_cli import ONE_STAGE

SRC = Path(__file__).resolve().parents[1] / "src"



def _invoke(*args: object, **env: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300", **env})


def _one_line(res) -> str:
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


# --- `--address` to a port where something listens that is not a Ray head ---

@contextmanager
def _silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never says a word (a stale port, a typo)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for conn in held:
            conn.close()


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # its log is not the command's output
        pass


@contextmanager
def _http_server() -> Iterator[int]:
    """A web server on 127.0.0.1: it answers, in HTTP/1.1, not in Ray's gRPC."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


SERVERS = {"silent": (_silent_server, "no answer"), "http": (_http_server, "unavailable")}


@pytest.mark.parametrize("kind", SERVERS)
def test_an_address_that_is_not_ray_is_one_line_within_the_timeout(tmp_path, kind):
    """Ray's own connect retried such a port for more than 5 minutes; the check answers within the timeout."""
    pytest.importorskip("ray")
    from mopd.execution.ray_address import check_address
    from mopd.execution.ray_executor import import_ray

    (tmp_path / "r.yaml").write_text(ONE_STAGE)
    server, why = SERVERS[kind]
    with server() as port:
        address = f"127.0.0.1:{port}"
        res = _invoke("run", tmp_path / "r.yaml", "--executor", "ray", "--address", address,
                      "--out", tmp_path / "out", **{CONNECT_TIMEOUT_ENV: "1"})
        line = _one_line(res)
        assert line.startswith(f"error: --address {address}: something listens there, but no Ray head answered "
                               f"within 1s ({why}"), line
        assert line.endswith("); give the head's GCS address (`ray start --head` prints it, port 6379 by default), "
                             f"or set ${CONNECT_TIMEOUT_ENV} for a slow link"), line
        assert not (tmp_path / "out").exists()
        ray = import_ray()
        timeout = 0.5
        start = time.monotonic()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(CONNECT_TIMEOUT_ENV, str(timeout))
            with pytest.raises(StageError, match="no Ray head answered within 0.5s"):
                check_address(ray, address)
        # the TCP connect and the question share the deadline; what is left is the channel's set-up and teardown
        assert time.monotonic() - start < timeout + 5.0


@pytest.mark.parametrize("value", ["soon", "0", "-3", "inf", "nan"])
def test_a_bad_connect_timeout_is_one_line(monkeypatch, value):
    monkeypatch.setenv(CONNECT_TIMEOUT_ENV, value)
    with pytest.raises(StageError, match=rf"^\${CONNECT_TIMEOUT_ENV}='{value}': expected a positive number"):
        connect_timeout()
    monkeypatch.setenv(CONNECT_TIMEOUT_ENV, "2.5")
    assert connect_timeout() == 2.5


# --- `resources: {gpus: N}` under the local executor ---

RL_STAGE = """\
  rl:
    kind: rlvr
    init: base
    steps: 1
    batch_size: 2
    group_size: 2
    rollout: {workers: 1, gpus: 1}
"""


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("key", ["resources", "rollout"])
def test_gpus_the_local_executor_does_not_have_are_one_line(tmp_path, monkeypatch, key):
    """Without the GPUs the stage would train on the CPU, slowly and without a word."""
    _gpus(monkeypatch, 0)
    # rollout workers belong to sampling stages: an rlvr stage after the tiny pretrain
    (tmp_path / "r.yaml").write_text(ONE_STAGE + "    resources: {gpus: 1}\n" if key == "resources" else
                                     ONE_STAGE + RL_STAGE)
    loaded = load_recipe(tmp_path / "r.yaml")
    stage = loaded.order[-1]
    with pytest.raises(StageError) as err:
        run_recipe(loaded, tmp_path / "out", Console(file=io.StringIO()), executor="local")
    assert str(err.value) == (f"stage {stage!r}: `{key}: {{gpus: 1}}`, but torch sees 0 GPU(s) here, and the local "
                              "executor runs every stage in this process: it would run on the CPU. Run with "
                              f"`--executor ray` on a cluster with the GPUs, or remove the stage's `{key}.gpus`")
    assert not (tmp_path / "out").exists()
    _gpus(monkeypatch, 1)
    check_local_gpus(loaded)  # a machine with the GPU runs it (on the GPU: `device: auto`)


# --- an actor teacher where `import ray` fails ---

ACTOR_RECIPE = """\
name: act
domains: [addition]
stages:
  base:
    kind: pretrain
    model: {hidden_size: 16, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 32}
    steps: 1
    batch_size: 4
  teacher:
    kind: rlvr
    init: base
    steps: 1
    batch_size: 2
    group_size: 2
  student:
    kind: mopd
    init: base
    teachers: {addition: teacher}
    teacher_backends: {teacher: {backend: actor}}
    steps: 1
    batch_size: 2
    group_size: 2
"""

# a sitecustomize that makes `import ray` fail: found (find_spec sees it) but broken, or refused by the finder
NO_RAY = {
    "broken": """\
import importlib.abc, importlib.machinery, sys
class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "ray" else None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ImportError("libray.so: cannot open shared object file")
sys.meta_path.insert(0, Broken())
""",
    "refused": """\
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "ray":
            raise ModuleNotFoundError("No module named 'ray'", name=name)
sys.meta_path.insert(0, Refuse())
""",
}


@pytest.mark.parametrize("how", NO_RAY)
def test_validate_refuses_an_actor_teacher_when_ray_does_not_import(tmp_path, how):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_RAY[how])
    (tmp_path / "r.yaml").write_text(ACTOR_RECIPE)
    probe = "import importlib.util as u\ntry:\n    print(u.find_spec('ray') is not None)\nexcept ImportError:\n" \
            "    print('refused')\n"
    env = {"PYTHONPATH": f"{tmp_path / 'site'}:{SRC}", "PATH": "/usr/bin:/bin", "COLUMNS": "300"}
    seen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert seen.stdout.strip() == {"broken": "True", "refused": "refused"}[how]  # what find_spec alone said
    res = subprocess.run([sys.executable, "-m", "mopd", "validate", str(tmp_path / "r.yaml")], env=env,
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    [line] = res.stdout.strip().splitlines()
    assert line.startswith("error: ") and "r.yaml:19: stages.student.teacher_backends: teacher 'teacher' has " \
        "`backend: actor`, which needs Ray (import ray: " in line, line
    assert line.endswith("): pip install 'mopd[ray]'"), line


# --- extras names (`mopd[ray]`) and other bracketed text through rich ---

EXTRA = re.compile(r"mopd\[[\w,-]+\]")


def _unescaped(text: str | None) -> str:
    return (text or "").replace("\\[", "[")


def test_the_help_prints_every_extras_name_as_written():
    """Every `mopd[...]` in a command's help texts (docstring, epilog, arguments and options) is in what
    `--help` prints, and the top-level help's command list keeps them too."""
    import inspect

    from typer.models import ParameterInfo

    found: set[str] = set()
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        texts = [command.help, command.epilog, *(p.default.help for p in
                                                 inspect.signature(command.callback).parameters.values()
                                                 if isinstance(p.default, ParameterInfo))]
        extras = set(EXTRA.findall(" ".join(map(_unescaped, texts))))
        res = _invoke(name, "--help")
        assert res.exit_code == 0, res.output
        assert "'mopd'" not in res.output and all(e in res.output for e in extras), (name, extras, res.output)
        found |= extras
    assert {"mopd[ray]", "mopd[serve]", "mopd[tensorboard]"} <= found  # the test reads what the help says
    top = _invoke("--help")
    assert "mopd[serve]" in top.output and "'mopd'" not in top.output


def test_messages_keep_their_brackets(tmp_path, monkeypatch):
    """A stage's failure (its progress line and the error line), a warning, the validate and run lines that name
    a path with brackets: each as written."""
    import mopd.execution.local_executor as local

    why = "this stage needs Ray: pip install 'mopd[ray]'"

    def fail(ctx):
        raise StageError(why)

    monkeypatch.setattr(local, "run_stage", fail)
    folder = tmp_path / "runs[1]"
    folder.mkdir()
    (folder / "r.yaml").write_text(ONE_STAGE)
    res = _invoke("run", folder / "r.yaml", "--out", folder / "out")
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert lines[-1] == f"error: stage 'base' failed: {why}"
    assert any(line.startswith("base  step ") and line.endswith(f"failed: {why}") for line in lines), res.output
    monkeypatch.undo()
    ok = _invoke("validate", folder / "r.yaml")
    assert ok.exit_code == 0 and ok.output.startswith(f"ok: {folder / 'r.yaml'}: 1 stage "), ok.output
    ran = _invoke("run", folder / "r.yaml", "--out", folder / "out", "--threads", "1")
    assert ran.exit_code == 0 and f"-> {folder / 'out'}" in ran.output, ran.output
    console = Console(file=io.StringIO(), width=300)
    warn_line(console, "the wandb tracker needs wandb: pip install 'mopd[wandb]'")
    assert console.file.getvalue() == "warning: the wandb tracker needs wandb: pip install 'mopd[wandb]'\n"


# --- run.json's wall time ---

def test_the_wall_time_counts_overlapping_stages_once():
    """Two stages at the same time (Ray): their union, not their sum; one after the other (local): the sum."""
    a, b = {"wall_seconds": 10.0, "ended_at": 110.0}, {"wall_seconds": 4.0, "ended_at": 106.0}
    assert busy_seconds([a, b]) == 10.0  # b inside a
    c = {"wall_seconds": 5.0, "ended_at": 113.0}
    assert busy_seconds([a, b, c]) == 13.0  # c from 108 to 113 overlaps a by 2
    d = {"wall_seconds": 4.0, "ended_at": 200.0}
    assert busy_seconds([a, d]) == 14.0  # the gap between them (an interrupted run) is not counted
    older = {"wall_seconds": 3.0}  # no ended_at: counted on its own
    junk = [{"wall_seconds": "3"}, {"wall_seconds": float("nan"), "ended_at": 1.0}, {"wall_seconds": -1.0,
            "ended_at": 5.0}, {"wall_seconds": 2.0, "ended_at": True}, {}]
    assert busy_seconds([a, older, *junk]) == 10.0 + 3.0 + 2.0
    assert busy_seconds([]) == 0.0


def test_the_wall_time_runs_from_the_start_of_each_run():
    """The time before a stage started (the driver's set-up of it, a Ray worker starting) is the run's too; a
    later run that resumed or reran stages adds its own span, and the time between the runs is not counted."""
    first = [{"wall_seconds": 3.0, "ended_at": 105.0, "run_started_at": 100.0},  # started at 102
             {"wall_seconds": 2.0, "ended_at": 109.0, "run_started_at": 100.0}]
    assert busy_seconds(first) == 9.0
    resumed = {"wall_seconds": 6.0, "ended_at": 310.0, "run_started_at": 300.0}  # 2 s of it checkpointed earlier
    assert busy_seconds([*first, resumed]) == 9.0 + 10.0
    early = {"wall_seconds": 15.0, "ended_at": 310.0, "run_started_at": 300.0}  # reaches back before its run
    assert busy_seconds([*first, early]) == 9.0 + 15.0
    assert busy_seconds([{**first[0], "run_started_at": "x"}]) == 3.0  # unreadable: the stage's own span


def test_a_rerun_keeps_the_wall_time_of_the_run_that_computed_its_stages(tmp_path):
    (tmp_path / "r.yaml").write_text(ONE_STAGE)
    loaded = load_recipe(tmp_path / "r.yaml")
    quiet = Console(file=io.StringIO())
    started = time.time()
    run_recipe(loaded, tmp_path / "out", quiet, executor="local")
    measured = time.time() - started
    import json

    first = json.loads((tmp_path / "out" / "run.json").read_text())
    stage = first["stages"]["base"]
    assert stage["wall_seconds"] <= first["wall_seconds"] <= measured + 0.01  # run.json rounds to 0.01 s
    run_recipe(loaded, tmp_path / "out", quiet, executor="local")
    again = json.loads((tmp_path / "out" / "run.json").read_text())
    assert again["stages"]["base"]["status"] == "cached" and again["wall_seconds"] == first["wall_seconds"]
