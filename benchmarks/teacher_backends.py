"""Where a 3-teacher MOPD step's teachers score: in process, on Ray actors, behind `mopd serve` (issue 16, item 2).

    .venv/bin/python benchmarks/teacher_backends.py [--steps 5] [--warmup 2] [--rows 48] [--tokens 16]

The benchmarks' models (`_common`: a 0.79M-parameter student, three 2.77M-parameter teachers, character
vocabulary) and the same batch for every backend: each step samples one rollout batch (rows spread over the
three domains, so each teacher scores a third of them), then times on that batch, backend after backend in a
rotating order, (1) the teacher scoring of the sampled objective (`sampled_logprobs`) and (2) the step's loss
and backward (`learner.policy.policy_loss`, no optimizer update, so every backend sees the same weights).

- `in-process`: `TeacherPanel`, the three teachers one after another at `--threads` torch threads;
- `actors`: `MixedPanel` over three Ray actors (`cpus: 0`, one torch thread each), all started, then waited;
- `http`: three `mopd serve` processes (`--threads 1`), one per teacher, requests in flight at once.
Where the time goes: the ideal is the in-process time of the slowest teacher alone on its rows (teachers that
overlap perfectly, nothing paid for moving them); for actors, the actors' own scoring time (`TeacherWorker.scoring_seconds`, the slowest of
the three, since they overlap), serialization (pickling the rows sent and the results returned, measured here),
and the rest (Ray's dispatch, object transfer, waiting); for HTTP, the servers' scoring (`mopd serve`'s own
endpoint runs the in-process panel's code on a teacher's rows: timed here as the slowest teacher alone), and the
rest (JSON, HTTP, the server framework). Medians over the timed steps. Writes benchmarks/results.json key "teacher_backends".
"""

from __future__ import annotations

import argparse
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import _common
import torch
from trl_vs_mopd import update_results

from mopd.core.schema import ActorBackend, HttpBackend
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.learner.rollout import rollout
from mopd.models.checkpoint import load_model
from mopd.teachers.panel import TeacherPanel
from mopd.teachers.remote import MixedPanel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mopd"), "serve", str(path), "--port", str(port),
                             "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mopd serve {path} did not start") from None
            time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rows", type=int, default=48, help="rows per step (a third per teacher)")
    ap.add_argument("--tokens", type=int, default=16, help="completion tokens per row")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    args = ap.parse_args()
    import ray

    from mopd.teachers.actor import start_actors
    from mopd.teachers.http import connect_all

    torch.set_num_threads(args.threads)
    from mopd.runtime import start_local_ray

    start_local_ray(ray, num_cpus=2, log_to_driver=False)
    tok = _common.build_char_tokenizer(_common.ALPHABET)
    names = [f"teacher{i}" for i in range(3)]
    routes = {d: names[i] for i, d in enumerate(_common.DOMAINS)}
    servers = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = _common.build_models(Path(tmp), n_teachers=3)
        for p in paths.values():
            tok.save_pretrained(p)
        student = load_model(paths["student"])
        teachers = {n: load_model(paths[n]).eval().requires_grad_(False) for n in names}
        actor = ActorBackend(backend="actor", resources={"cpus": 0.0})
        actors = start_actors("bench", {n: str(paths[n]) for n in names}, dict.fromkeys(names, actor),
                              torch.float32, None)
        for n in names:
            servers.append(_serve(paths[n]))
        served = connect_all("bench", {n: HttpBackend(backend="http", url=url) for n, (_, url) in zip(
            names, servers, strict=True)}, tok)
        backends = {
            "in-process": TeacherPanel(models=teachers, teacher_of_domain=routes),
            "actors": MixedPanel(local=None, remote=actors, teacher_of_domain=routes),
            "http": MixedPanel(local=None, remote=served, teacher_of_domain=routes),
        }
        settings = _common.mopd_settings(args.tokens, "sampled")
        times = {k: {"scoring": [], "step": []} for k in backends}
        parts = {"actors": {"actor_scoring": [], "serialization": []}, "http": {"server_scoring": []},
                 "in-process": {"slowest_teacher_alone": []}}
        try:
            for i in range(args.warmup + args.steps):
                problems = _common.problems(args.rows, seed=i)
                domains = {p.domain: _common.get_domain(p.domain) for p in problems}
                batch, _ = rollout(student, tok, problems, domains, settings, temperature=1.0,
                                   generator=torch.Generator().manual_seed(i))
                route = backends["in-process"].route(batch)
                order = list(backends)[i % 3:] + list(backends)[: i % 3]
                for name in order:
                    panel = backends[name]
                    if name == "actors":
                        ray.get([a.handle.scoring_seconds.remote() for a in actors.values()])
                    t_score = _common.timed(lambda p=panel, b=batch, r=route: p.sampled_logprobs(b, r))
                    if name == "actors":
                        actor_s = max(ray.get([a.handle.scoring_seconds.remote() for a in actors.values()]))
                    cfg = PolicyConfig(sampling=settings, distill=settings, teachers=panel)

                    def step(cfg=cfg, batch=batch):
                        loss, _ = policy_loss(student, batch, cfg, temperature=1.0)
                        loss.backward()
                        student.zero_grad(set_to_none=True)
                    t_step = _common.timed(step)
                    if i < args.warmup:
                        continue
                    times[name]["scoring"].append(t_score)
                    times[name]["step"].append(t_step)
                    if name == "actors":
                        parts["actors"]["actor_scoring"].append(actor_s)
                        parts["actors"]["serialization"].append(_serialization(batch, route, names))
                    if name == "in-process":
                        parts["in-process"]["slowest_teacher_alone"].append(_slowest_teacher(panel, batch, route))
                    if name == "http":
                        # `mopd serve`'s own endpoint runs the in-process panel's code on each teacher's rows
                        parts["http"]["server_scoring"].append(_slowest_teacher(backends["in-process"], batch, route))
        finally:
            for proc, _ in servers:
                proc.terminate()
                proc.wait(timeout=30)
    med = {k: {m: _common.median(v) for m, v in d.items()} for k, d in times.items()}
    brk = {k: {m: _common.median(v) for m, v in d.items()} for k, d in parts.items()}
    base = med["in-process"]
    result = {
        "machine": _common.machine() + " (shared by several engineers' jobs: contended)",
        "command": "python benchmarks/teacher_backends.py " + " ".join(sys.argv[1:]),
        "rows": args.rows, "completion_tokens": args.tokens, "threads": args.threads, "timed_steps": args.steps,
        "median_seconds": med,
        "ratio_to_in_process": {k: {m: v[m] / base[m] for m in v} for k, v in med.items()},
        "in_process_slowest_teacher_alone": brk["in-process"]["slowest_teacher_alone"],
        "actors_breakdown": {**brk["actors"], "dispatch_transfer_wait": med["actors"]["scoring"]
                             - brk["actors"]["actor_scoring"] - brk["actors"]["serialization"]},
        "http_breakdown": {**brk["http"], "json_http_framework": med["http"]["scoring"]
                           - brk["http"]["server_scoring"]},
    }
    update_results("teacher_backends", result)
    import json

    print(json.dumps(result, indent=2))


def _slowest_teacher(panel, batch, route: list[str]) -> float:
    """The in-process time of the slowest teacher on its own rows: what perfectly overlapped teachers would take."""
    worst = 0.0
    for n in sorted(set(route)):
        rows = torch.tensor([i for i, r in enumerate(route) if r == n])
        sub, names = batch.select(rows), [n] * len(rows)
        worst = max(worst, _common.timed(lambda s=sub, m=names: panel.sampled_logprobs(s, m)))
    return worst


def _serialization(batch, route: list[str], names: list[str]) -> float:
    """Pickling each teacher's rows (ids, masks) there and its [b, T] result back, as Ray does for tensors."""
    start = time.perf_counter()
    for n in names:
        rows = torch.tensor([i for i, r in enumerate(route) if r == n])
        sub = batch.select(rows)
        args = (sub.input_ids_B_T, sub.attention_mask_B_T, sub.completion_mask_B_T)
        pickle.loads(pickle.dumps(args))
        pickle.loads(pickle.dumps(torch.zeros_like(sub.completion_mask_B_T)))
    return time.perf_counter() - start
