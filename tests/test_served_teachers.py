"""Served teachers as others run them: SGLang's native API, bad answers, API keys, replicas and restarts, request
order, and HTTP runs that equal in-process runs byte for byte."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from mopd.core.errors import StageError
from mopd.core.schema import HttpBackend
from mopd.models.checkpoint import load_model
from mopd.recipe.load import load_recipe
from mopd.teachers.http import ServerError, connect, connect_all
from mopd.teachers.preflight import PreflightError
from mopd.teachers.remote import MixedPanel

from .fake_servers import fake_server
from .test_serve import free_port, served
from .test_teacher_backends import ROUTES, _metrics, _recipe, assert_same_scores, scoring_setup

pytest.importorskip("fastapi")


def http(url, **kw) -> HttpBackend:
    return HttpBackend(backend="http", url=url, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return scoring_setup(tmp_path_factory.mktemp("served"))


def test_sglang_and_vllm_teachers_score_what_the_in_process_panel_scores(setup):
    """Teacher a behind SGLang's native /generate, teacher b behind vLLM's /v1/completions (fakes that answer in the
    shapes those servers' code defines, from the same checkpoints): sampled-token logprobs and top-k are the
    in-process panel's, to the rounding of scoring each prompt alone (tests/rounding.py)."""
    dirs, tok, batch, panel = setup
    a, b = (load_model(dirs[n]).eval() for n in "ab")
    with fake_server(a, tok, "sglang") as (root_a, seen), fake_server(b, tok, "vllm") as (root_b, _):
        remote = connect_all("s", {"a": http(root_a, api="sglang"), "b": http(root_b + "/v1")}, tok)
        mixed = MixedPanel(local=None, remote=remote, teacher_of_domain=ROUTES)
        assert_same_scores(panel, mixed, batch, full=False)
    generate = [r for r in seen if "input_ids" in r]
    assert generate and all(r["return_logprob"] and r["logprob_start_len"] == 0 and
                            r["sampling_params"]["max_new_tokens"] == 0 for r in generate)


def test_sglangs_openai_endpoint_is_refused_in_one_line(setup):
    """SGLang's /v1/completions drops `prompt_logprobs` silently: `api: openai` against it is one line that says
    to use `api: sglang`, before step 0 (the order check scores a probe)."""
    dirs, tok, _, _ = setup
    with fake_server(load_model(dirs["a"]).eval(), tok, "sglang") as (root, _), \
            pytest.raises(PreflightError) as err:
        connect("s", "t", http(root + "/v1"), tok)
    [line] = str(err.value).splitlines()
    assert f"teacher 't' at {root}/v1/completions: bad answer: row 0: no prompt_logprobs" in line
    assert "set api: sglang" in line


def _set(rows, fmt, fn):
    """Apply fn(entry) to every (logprob-holding) entry of the answer rows."""
    for r in rows:
        if fmt == "vllm":
            for pos in r["prompt_logprobs"][1:]:
                for e in pos.values():
                    fn(e)
    return rows


def _plus3(fmt, rows):
    return _set(rows, fmt, lambda e: e.update(logprob=3.0))


def _nan(fmt, rows):
    rows[0]["prompt_logprobs"][2] = {k: {**e, "logprob": math.nan} for k, e in rows[0]["prompt_logprobs"][2].items()}
    return rows


def _missing(fmt, rows):
    rows[0]["prompt_logprobs"][3] = {"99": {"logprob": -1.0, "rank": 1}}
    return rows


def _short(fmt, rows):
    rows[0]["meta_info"]["input_token_logprobs"].pop()
    return rows


def _other_ids(fmt, rows):
    entry = rows[0]["meta_info"]["input_token_logprobs"][2]
    entry[1] += 1
    return rows


def _unsorted(fmt, rows):
    rows[0]["meta_info"]["input_top_logprobs"][2].reverse()
    return rows


def _mass(fmt, rows):
    for e in rows[0]["meta_info"]["input_top_logprobs"][2]:
        e[0] = math.log(0.6)
    return rows


@pytest.mark.parametrize("fmt,corrupt,k,says", [
    ("vllm", _plus3, 0, "logprob +3 > 0 (a logprob is never positive)"),
    ("vllm", _nan, 0, "logprob nan is not finite"),
    ("vllm", _missing, 0, "position 3: no entry for token"),
    ("sglang", _short, 0, "logprob entries for"),
    ("sglang", _other_ids, 0, "position 2: scored token"),
    ("sglang", _unsorted, 3, "position 2: the top-3 logprobs are not sorted"),
    ("sglang", _mass, 3, "position 2: the top-3 probabilities add up to 1.8 > 1"),
], ids=["positive", "nan", "missing-entry", "one-short", "other-ids", "unsorted-topk", "mass-above-1"])
def test_a_bad_answer_is_one_line_naming_teacher_url_and_what(setup, fmt, corrupt, k, says):
    dirs, tok, batch, _ = setup
    model = load_model(dirs["a"]).eval()
    with fake_server(model, tok, fmt, corrupt=corrupt) as (root, _):
        url = root + "/v1" if fmt == "vllm" else root
        teacher = connect("s", "t_math", http(url, api="openai" if fmt == "vllm" else "sglang", order_check=False),
                          tok)
        with pytest.raises(ServerError) as err:
            (teacher.topk(batch, k, 4) if k else teacher.sampled(batch))()
    [line] = str(err.value).splitlines()
    endpoint = "/v1/completions" if fmt == "vllm" else "/generate"
    assert line.startswith(f"stage 's': teacher 't_math' at {root}{endpoint}: bad answer: row 0") and says in line


def test_a_run_whose_teacher_answers_positive_logprobs_fails_in_one_line(tmp_path):
    """The +3.0 server that once gave exit 0 and a normalized score of 2.6: now the stage stops at its preflight."""
    from mopd.envs import ALPHABET
    from mopd.execution.runner import run_recipe
    from mopd.models.tokenizer import build_char_tokenizer

    path = _recipe(tmp_path)
    model = load_model(tmp_path / "a").eval()
    with fake_server(model, build_char_tokenizer(ALPHABET), "vllm", corrupt=_plus3) as (root, _):
        extra = f"    teacher_backends: {{{tmp_path}/a: {{backend: http, url: '{root}/v1', order_check: false}}}}\n"
        with pytest.raises(StageError) as err:
            run_recipe(load_recipe(_recipe(tmp_path, extra)), tmp_path / "run")
    [line] = str(err.value).splitlines()
    assert f"teacher '{tmp_path}/a' at {root}/v1/completions: bad answer" in line and "> 0" in line
    assert path.exists() and not (tmp_path / "run" / "student" / "metrics.jsonl").exists()


def test_an_api_key_is_sent_and_never_shown(setup, tmp_path, monkeypatch, capfd):
    """A server that wants a key: without one, one line that says so; with `api_key_env`, the teacher scores; the
    key appears in no message, no file of the run directory, and no output."""
    from mopd.execution.runner import run_recipe

    dirs, tok, batch, panel = setup
    secret = "sk-mopd-test-0123456789"
    path = _recipe(tmp_path)
    with served(tmp_path / "a", api_key=secret) as url:
        with pytest.raises(PreflightError) as err:
            connect("s", "t", http(url), tok)
        [line] = str(err.value).splitlines()
        assert "HTTP 401" in line and "set api_key_env" in line and secret not in line
        monkeypatch.setenv("TEACHER_KEY", "wrong")
        with pytest.raises(PreflightError) as err:
            connect("s", "t", http(url, api_key_env="TEACHER_KEY"), tok)
        assert "refused the API key" in str(err.value) and "wrong" not in str(err.value)
        monkeypatch.setenv("TEACHER_KEY", secret)
        extra = f"    teacher_backends: {{{tmp_path}/a: {{backend: http, url: '{url}', api_key_env: TEACHER_KEY}}}}\n"
        run_recipe(load_recipe(_recipe(tmp_path, extra)), tmp_path / "run")
    assert path.exists() and (tmp_path / "run" / "student" / "final").is_dir()
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    out, errs = capfd.readouterr()
    assert secret not in out + errs
    monkeypatch.delenv("TEACHER_KEY")
    with pytest.raises(PreflightError, match="the environment variable TEACHER_KEY is not set"):
        connect("s", "t", http("http://127.0.0.1:9/v1", api_key_env="TEACHER_KEY"), tok)


def test_backoff_bridges_a_restart_and_gives_up_when_bounded(setup):
    """The only replica goes down and comes back 1.5 s later on the same port: the request waits (0.5, 1, 2 s ...)
    and gets its answer. Down for good with `retry_wait: 1`: one line after about a second of backoff."""
    dirs, tok, batch, panel = setup
    port = free_port()
    with served(dirs["a"], port=port) as url:
        teacher = connect("s", "a", http(url, timeout=5), tok)
    names = ["a"] * batch.size
    want = panel.sampled_logprobs(batch, names)
    came_back, done = threading.Event(), threading.Event()

    def restart():
        time.sleep(1.5)
        with served(dirs["a"], port=port):
            came_back.set()
            done.wait(30)

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    start = time.perf_counter()
    got = teacher.sampled(batch)()
    assert came_back.is_set() and 1.4 < time.perf_counter() - start < 6
    assert torch.equal(got, want)  # the exact endpoint: the in-process numbers (one process, one thread count)
    done.set()
    thread.join()  # the restarted server is gone again
    teacher.backend = teacher.replicas.backend = http(url, timeout=5, retry_wait=1.0)
    start = time.perf_counter()
    with pytest.raises(ServerError) as err:
        teacher.sampled(batch)()
    [line] = str(err.value).splitlines()
    assert "cannot connect" in line and "s of backoff over 1 replica(s)" in line
    assert time.perf_counter() - start < 3


def _stale_second(fmt, rows):
    """A server whose cached prefix leaks into the second prompt of a request (vLLM issue 42019's symptom)."""
    if len(rows) == 2:
        for pos in rows[1]["prompt_logprobs"][1:]:
            for e in pos.values():
                e["logprob"] -= 2.0
    return rows


def test_scores_that_depend_on_request_order_are_one_line_before_step_0(setup):
    dirs, tok, _, _ = setup
    model = load_model(dirs["a"]).eval()
    with fake_server(model, tok, "vllm", corrupt=_stale_second) as (root, seen):
        with pytest.raises(PreflightError) as err:
            connect("s", "t", http(root + "/v1"), tok)
        [line] = str(err.value).splitlines()
        assert "scores one prompt differently when another shares its prefix" in line
        assert "--no-enable-prefix-caching" in line and "order BA" in line
        connect("s", "t", http(root + "/v1", order_check=False), tok)  # the user's choice
    with fake_server(model, tok, "vllm") as (root, _):
        connect("s", "t", http(root + "/v1"), tok)  # a server without the fault passes


def _start_replica(model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mopd"), "serve", str(model_dir), "--port", str(port),
                             "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}/v1"


def _wait_up(procs) -> None:
    deadline = time.time() + 90
    for proc, url in procs:
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline
                time.sleep(0.2)


def test_a_run_over_http_with_a_killed_replica_has_the_in_process_numbers(tmp_path, monkeypatch):
    """The same MOPD stage with in-process teachers, and with both teachers served: teacher a by two `mopd serve`
    replicas (processes), one of them killed with SIGKILL as the second step scores. The same metrics, step for
    step, and the same final weights, byte for byte.

    Exact equality is sound on any CPU for the reason the actor test gives: `mopd serve`'s own endpoint scores a
    teacher's rows as the in-process panel does (the same tensors, the same code, one torch thread on both sides),
    so a difference would be a difference in what is computed."""
    from mopd.execution.runner import run_recipe

    path = _recipe(tmp_path)
    replicas = [_start_replica(tmp_path / "a") for _ in range(2)]
    calls, killed, tried = [], [], []
    original = MixedPanel.sampled_logprobs
    import mopd.teachers.http_client as client

    send = client.request_once

    def recorded(url, *args):
        try:
            answer = send(url, *args)
        except client.ServerError:
            tried.append((url, False))
            raise
        tried.append((url, True))
        return answer

    monkeypatch.setattr(client, "request_once", recorded)

    def kill_on_second_step(self, batch, names_B):
        calls.append(time.perf_counter())
        if len(calls) == 2:  # kill the replica whose turn is next (the other one answered last)
            last = next(u for u, ok in reversed(tried) if u.endswith("/mopd/score"))
            proc, url = next((p, u) for p, u in replicas if not last.startswith(u + "/"))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed.append(url)
        return original(self, batch, names_B)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _wait_up(replicas)
        run_recipe(load_recipe(path), tmp_path / "local")
        monkeypatch.setattr(MixedPanel, "sampled_logprobs", kill_on_second_step)
        with served(tmp_path / "b") as url_b:
            urls = [u for _, u in replicas]
            extra = (f"    teacher_backends: {{{tmp_path}/a: {{backend: http, url: {json.dumps(urls)}}}, "
                     f"{tmp_path}/b: {{backend: http, url: '{url_b}'}}}}\n")
            run_recipe(load_recipe(_recipe(tmp_path, extra)), tmp_path / "http")
    finally:
        torch.set_num_threads(threads)
        for proc, _ in replicas:
            proc.kill()
            proc.wait()
    assert killed and len(calls) >= 2
    dead, alive = (u + "/mopd/score" for u in sorted((u for _, u in replicas), key=lambda u: u != killed[0]))
    assert (dead, False) in tried and (alive, True) in tried[tried.index((dead, False)):]  # failed over
    assert _metrics(tmp_path / "http") == _metrics(tmp_path / "local")
    weights = [(tmp_path / run / "student" / "final" / "model.safetensors").read_bytes() for run in ("local", "http")]
    assert weights[0] == weights[1]
    pre = json.loads((tmp_path / "http" / "student" / "preflight.json").read_text())
    assert pre["remote_teachers"] == {f"{tmp_path}/a": "http", f"{tmp_path}/b": "http"}
    assert pre["served_teachers"][f"{tmp_path}/a"]["urls"] == [u for _, u in replicas]
    assert pre["served_teachers"][f"{tmp_path}/b"]["scoring"].startswith("mopd serve")
