"""HTTP teachers against `mopd serve` (vLLM's request and response format): the scores are the in-process
panel's, a run scores as with in-process teachers, and an unreachable server, a timeout, another tokenizer or
another model name is one line before step 0."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mopd.core.errors import StageError
from mopd.core.schema import HttpBackend
from mopd.envs import ALPHABET
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.load import load_recipe
from mopd.teachers.http import ServerError, connect, connect_all
from mopd.teachers.preflight import PreflightError
from mopd.teachers.remote import MixedPanel

from .rounding import gamma, two_path_logprob_tol
from .test_teacher_backends import (
    ROUTES,
    TINY,
    _metrics,
    _recipe,
    assert_same_scores,
    save_models,
    scoring_setup,
)

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


@contextmanager
def served(model_dir: Path, name: str | None = None, dtype=None, port: int = 0, **app_kw):
    """`mopd serve`'s app on a free port (or `port`), in a thread (the model in `dtype`, default float32); yields
    its OpenAI base URL. `app_kw`: `build_app`'s api_key and owned_by."""
    from mopd.teachers.serve import build_app

    server = uvicorn.Server(uvicorn.Config(build_app(model_dir, name, dtype, **app_kw), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, **kw) -> HttpBackend:
    return HttpBackend(backend="http", url=url, **kw)


@pytest.mark.parametrize("owner", ["mopd", "vllm"])
def test_http_teachers_score_what_the_in_process_panel_scores(tmp_path, owner):
    """Through `mopd serve`'s own endpoint (the padded batch) and through vLLM's `prompt_logprobs` (a server that
    does not say it is `mopd serve`: the rows of a request scored as one right-padded batch)."""
    dirs, tok, batch, panel = scoring_setup(tmp_path)
    with served(dirs["a"], owned_by=owner) as url_a, served(dirs["b"], owned_by=owner) as url_b:
        remote = connect_all("s", {"a": http(url_a), "b": http(url_b, concurrency=2)}, tok)
        assert remote["a"].model == "a"  # the server's only model, by the directory's name
        assert remote["a"].exact == (owner == "mopd")
        mixed = MixedPanel(local=None, remote=remote, teacher_of_domain=ROUTES)
        assert_same_scores(panel, mixed, batch, full=False)
        with pytest.raises(ServerError, match="returns top-k logprobs, not full logits"):
            mixed.full_logits(batch, mixed.route(batch))


def test_the_response_is_vllms_prompt_logprobs(tmp_path):
    """One prompt of ids with prompt_logprobs 2: null first, then per token a dict keyed by token id (a string in
    JSON) with logprob, rank and decoded_token, holding the actual token and the 2 best, ranked from 1."""
    dirs = save_models(tmp_path, {"t": 1})
    tok = build_char_tokenizer(ALPHABET)
    ids = tok("12+3=", add_special_tokens=False)["input_ids"]
    with served(dirs["t"], name="teacher") as url:
        body = json.dumps({"model": "teacher", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2}).encode()
        req = urllib.request.Request(url + "/completions", data=body, headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
    [choice] = answer["choices"]
    lps = choice["prompt_logprobs"]
    assert answer["object"] == "text_completion" and len(lps) == len(ids) and lps[0] is None
    for j in range(1, len(ids)):
        entries = lps[j]
        assert str(ids[j]) in entries and 2 <= len(entries) <= 3
        ranks = sorted(e["rank"] for e in entries.values())
        assert ranks[:2] == [1, 2]
        best = max(entries.values(), key=lambda e: e["logprob"])
        assert best["rank"] == 1 and set(best) == {"logprob", "rank", "decoded_token"}


def test_an_unreachable_server_is_one_line(tmp_path):
    tok = build_char_tokenizer(ALPHABET)
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(PreflightError) as err:
        connect("student", "t_math", http(url, retries=0, timeout=5), tok)
    [line] = str(err.value).splitlines()
    assert line.startswith(f"stage 'student': teacher 't_math' at {url}: the server does not list its models")
    assert "cannot connect" in line


def test_a_server_that_does_not_answer_is_a_timeout_in_one_line():
    tok = build_char_tokenizer(ALPHABET)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        start = time.perf_counter()
        with pytest.raises(PreflightError) as err:
            connect("student", "t", http(url, retries=1, timeout=0.3), tok)
    [line] = str(err.value).splitlines()
    assert "no answer within 0.3s (timeout)" in line and time.perf_counter() - start < 5


def test_a_server_with_another_tokenizer_is_refused_in_one_line(tmp_path):
    """A teacher whose vocabulary has one more character: its /tokenize of the probe differs from the student's."""
    foreign = save_models(tmp_path, {"foreign": 1}, alphabet=ALPHABET + "!")  # "!" shifts most ids by one
    with served(foreign["foreign"]) as url, pytest.raises(PreflightError) as err:
        connect("student", "t", http(url), build_char_tokenizer(ALPHABET))
    [line] = str(err.value).splitlines()
    assert "uses a different tokenizer from the student" in line and "first difference at token" in line


def test_a_model_the_server_does_not_serve_is_one_line(tmp_path):
    dirs = save_models(tmp_path, {"t": 1})
    tok = build_char_tokenizer(ALPHABET)
    with served(dirs["t"], name="served-name") as url, pytest.raises(PreflightError) as err:
        connect("student", "t", http(url, model="other"), tok)
    assert str(err.value).endswith("the server does not serve model 'other' (it serves ['served-name'])")


def test_a_run_with_http_teachers_has_the_in_process_numbers(tmp_path, monkeypatch):
    """The same MOPD stage with in-process teachers and with both teachers behind `mopd serve`: at every step the
    server's scores of that step's batch are the in-process panel's, and the first step's metrics are the
    in-process run's (the sampled objective reads one logprob per token, which the server ships).

    Both to float32 rounding of two kernel paths (tests/rounding.py): the server scores each row alone. And only
    the first step is compared between the runs: AdamW's first update is about lr * sign(g), so where a gradient
    entry is near zero that rounding moves the weight by a whole step, and the later steps are not determined."""
    from mopd.execution.runner import run_recipe
    from mopd.models.checkpoint import load_model
    from mopd.teachers.panel import TeacherPanel

    path = _recipe(tmp_path)
    in_process = TeacherPanel(models={f"{tmp_path}/{t}": load_model(tmp_path / t).eval() for t in "ab"},
                              teacher_of_domain={})
    checked: list[tuple[float, float]] = []  # per call: largest difference from the in-process scores, its bound
    original = MixedPanel.sampled_logprobs

    def against_in_process(self, batch, names_B):
        got = original(self, batch, names_B)
        with torch.no_grad():
            tol = two_path_logprob_tol(TINY, in_process.full_logits(batch, names_B))
            checked.append((float((got - in_process.sampled_logprobs(batch, names_B)).abs().max()), tol))
        return got

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_recipe(load_recipe(path), tmp_path / "local")
        monkeypatch.setattr(MixedPanel, "sampled_logprobs", against_in_process)
        with served(tmp_path / "a") as url_a, served(tmp_path / "b") as url_b:
            extra = (f"    teacher_backends: {{{tmp_path}/a: {{backend: http, url: '{url_a}'}}, "
                     f"{tmp_path}/b: {{backend: http, url: '{url_b}'}}}}\n")
            run_recipe(load_recipe(_recipe(tmp_path, extra)), tmp_path / "http")
    finally:
        torch.set_num_threads(threads)
    assert len(checked) >= 2 and all(diff <= tol for diff, tol in checked), checked  # both steps
    local, remote = _metrics(tmp_path / "local"), _metrics(tmp_path / "http")
    assert [r.keys() for r in local] == [r.keys() for r in remote]
    # step 1, from the same weights and rollouts: the teachers' logprobs enter through the advantages, times
    # importance weights <= 2, and token means (of 4 rows x 6 tokens, terms <= 10) round in float32
    a, b = (next(r for r in rows if "loss" in r) for rows in (local, remote))
    assert a["step"] == b["step"] == 1
    bound = 2 * max(tol for _, tol in checked) + 2 * gamma(4 * 6) * 10
    assert {k: pytest.approx(v, rel=0, abs=bound) for k, v in a.items()} == b
    pre = json.loads((tmp_path / "http" / "student" / "preflight.json").read_text())
    assert pre["remote_teachers"] == {f"{tmp_path}/a": "http", f"{tmp_path}/b": "http"}
    local_pre = json.loads((tmp_path / "local" / "student" / "preflight.json").read_text())
    for t in "ab":  # a served teacher's KL is the sampled-token estimate; the tokens are those of the same rollouts
        entry, exact = pre["teachers"][f"{tmp_path}/{t}"], local_pre["teachers"][f"{tmp_path}/{t}"]
        assert entry["estimate"] == "sampled-token" and entry["tokens"] == exact["tokens"]


def test_mopd_serve_command(tmp_path):
    """`mopd serve DIR --port P --name N` answers /v1/models; a directory without a model is one line."""
    dirs = save_models(tmp_path, {"t": 1})
    mopd = [str(Path(sys.executable).parent / "mopd")]
    bad = subprocess.run([*mopd, "serve", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a Hugging Face model directory (no config.json)" in bad.stdout
    port = free_port()
    proc = subprocess.Popen([*mopd, "serve", str(dirs["t"]), "--port", str(port), "--name", "tiny", "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while True:
            try:
                answer = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read())
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.2)
        assert [m["id"] for m in answer["data"]] == ["tiny"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_run_with_an_unreachable_teacher_fails_in_one_line_before_step_0(tmp_path):
    from mopd.execution.runner import run_recipe

    url = f"http://127.0.0.1:{free_port()}/v1"
    extra = f"    teacher_backends: {{{tmp_path}/a: {{backend: http, url: '{url}', retries: 0}}}}\n"
    with pytest.raises(StageError) as err:  # the local executor's one line per failed stage
        run_recipe(load_recipe(_recipe(tmp_path, extra)), tmp_path / "run")
    [line] = str(err.value).splitlines()
    assert line.startswith(f"stage 'student': teacher '{tmp_path}/a' at {url}: ") and "cannot connect" in line
    assert not (tmp_path / "run" / "student" / "metrics.jsonl").exists()
