"""What a dying teacher server costs a run: a killed replica, and a restarted single server (issue 36).

    .venv/bin/python benchmarks/served_failover.py [--trials 3] [--calls 10] [--rows 48] [--tokens 16]

One teacher of the benchmarks' models (`_common`: 2.77M parameters, character vocabulary) served by `mopd serve`
processes (`--threads 1`); the scoring call is the sampled objective's (`HttpTeacher.sampled` on one rollout
batch of `--rows` rows), compared each time with the in-process panel's scores of that batch, byte for byte.
- **failover**: two replicas; `--calls` calls in a row, and before the middle one the replica whose turn it is
  next is killed with SIGKILL. Reported: the median call, the call that met the dead replica, and the extra
  seconds it cost. Then, with both up again, the replica serving a call is killed half a median call after the
  call starts (in flight): that call's seconds and its extra. The killed replicas are restarted.
- **restart**: one server, killed with SIGKILL and started again at once; one call is made while it starts.
  Reported: that call's seconds and the server's start-up seconds (process start to its first answer), the
  backoff's share being the difference.
Medians over `--trials`. Writes benchmarks/results.json key "served_failover".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import _common
import torch
from teacher_backends import _serve
from trl_vs_mopd import update_results

from mopd.core.schema import HttpBackend
from mopd.learner.rollout import rollout
from mopd.models.checkpoint import load_model
from mopd.teachers.http import connect
from mopd.teachers.panel import TeacherPanel


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = _common.build_char_tokenizer(_common.ALPHABET)
    failover, restart, identical = [], [], True
    with tempfile.TemporaryDirectory() as tmp:
        paths = _common.build_models(Path(tmp), n_teachers=1)
        for p in paths.values():
            tok.save_pretrained(p)
        student, teacher = load_model(paths["student"]), load_model(paths["teacher0"]).eval()
        problems = _common.problems(args.rows, seed=0)
        domains = {p.domain: _common.get_domain(p.domain) for p in problems}
        batch, _ = rollout(student, tok, problems, domains, _common.mopd_settings(args.tokens, "sampled"),
                           temperature=1.0, generator=torch.Generator().manual_seed(0))
        want = TeacherPanel(models={"t": teacher}, teacher_of_domain={}).sampled_logprobs(batch, ["t"] * batch.size)
        replicas = [_serve(paths["teacher0"]) for _ in range(2)]
        try:
            for _ in range(args.trials):
                client = connect("bench", "t", HttpBackend(backend="http", url=[u for _, u in replicas]), tok)
                seconds, hit = [], None
                for i in range(args.calls):
                    if i == args.calls // 2:
                        nxt = client.replicas.bases[(client.replicas.turn + 1) % 2]
                        hit = next(k for k, (_, u) in enumerate(replicas) if u == nxt)
                        _kill(replicas[hit][0])
                    start = time.perf_counter()
                    got = client.sampled(batch)()
                    seconds.append(time.perf_counter() - start)
                    identical &= torch.equal(got, want)
                steady = _common.median(seconds[: args.calls // 2])
                replicas[hit] = _serve(paths["teacher0"])
                client = connect("bench", "t", HttpBackend(backend="http", url=[u for _, u in replicas]), tok)
                nxt = client.replicas.bases[(client.replicas.turn + 1) % 2]
                hit2 = next(k for k, (_, u) in enumerate(replicas) if u == nxt)
                timer = threading.Timer(steady / 2, _kill, args=(replicas[hit2][0],))
                start = time.perf_counter()
                timer.start()
                got = client.sampled(batch)()
                in_flight = time.perf_counter() - start
                timer.join()
                identical &= torch.equal(got, want)
                failover.append({"steady": steady, "met_dead": seconds[args.calls // 2],
                                 "extra": seconds[args.calls // 2] - steady, "killed_in_flight": in_flight,
                                 "extra_in_flight": in_flight - steady})
                replicas[hit2] = _serve(paths["teacher0"])
            for _ in range(args.trials):
                proc, url = replicas[0]
                client = connect("bench", "t", HttpBackend(backend="http", url=url), tok)
                _kill(proc)
                started = time.perf_counter()
                port = int(url.rsplit(":", 1)[1].split("/")[0])
                new = subprocess.Popen([str(Path(sys.executable).parent / "mopd"), "serve", str(paths["teacher0"]),
                                        "--port", str(port), "--threads", "1"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                seen: dict = {}
                watcher = _watch_start(url, started, seen)
                got = client.sampled(batch)()
                call = time.perf_counter() - started
                identical &= torch.equal(got, want)
                replicas[0] = (new, url)
                watcher.join(timeout=120)
                restart.append({"call": call, "server_up": seen["up"], "waiting_after_up": call - seen["up"]})
        finally:
            for proc, _ in replicas:
                proc.kill()
                proc.wait()
    med = {k: _common.median([t[k] for t in failover]) for k in failover[0]}
    result = {
        "machine": _common.machine() + " (shared with other jobs: contended)",
        "command": "python benchmarks/served_failover.py " + " ".join(sys.argv[1:]),
        "rows": args.rows, "completion_tokens": args.tokens, "trials": args.trials,
        "failover_median_seconds": med,
        "restart_median_seconds": {k: _common.median([t[k] for t in restart]) for k in restart[0]},
        "scores_identical_to_in_process": bool(identical),
        "trials_detail": {"failover": failover, "restart": restart},
    }
    update_results("served_failover", result)
    print(json.dumps(result, indent=2))


def _watch_start(url: str, started: float, out: dict) -> threading.Thread:
    """A thread that asks `url`/models every 50 ms and stores the seconds from `started` to the first answer."""
    def watch():
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=1).read()
                out["up"] = time.perf_counter() - started
                return
            except OSError:
                time.sleep(0.05)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


if __name__ == "__main__":
    main()
