"""What a MOPD stage's eval transcripts cost (issue 38): the demo student's held-out eval (reversal, sorting,
shift x 300 prompts, greedy) alone, with its transcripts, and with transcripts and each turn's teacher KL (the
student's forward and the routed teacher's sampled-token scores over every row); medians of N runs, interleaved,
in one process, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transcript_cost.py runs/demo --repeats 5

`runs/demo` is a finished `mopd demo` run (its student and teachers' final checkpoints).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from mopd.core.schema import EvalSettings
from mopd.envs import get_domain
from mopd.eval.evaluate import evaluate
from mopd.eval.transcripts import transcripts
from mopd.models.checkpoint import load_model, load_tokenizer
from mopd.models.prompting import with_pad_token
from mopd.stages.samples import teacher_kl
from mopd.teachers.panel import TeacherPanel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `mopd demo` run directory")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    student = load_model(args.run / "student" / "final").eval()
    tok = with_pad_token(load_tokenizer(args.run / "student" / "final"))
    domains = [get_domain(d) for d in ("reversal", "sorting", "shift")]
    of = {d.name: f"teacher_{d.name}" for d in domains}
    panel = TeacherPanel({t: load_model(args.run / t / "final").eval() for t in of.values()}, of)
    kl = teacher_kl(SimpleNamespace(teacher_of_domain=of), lambda step: panel)
    settings = EvalSettings(size=300, max_new_tokens=10)

    def run(record) -> None:
        evaluate(student, tok, domains, settings, on_batch=record)

    cases = {
        "eval alone": None,
        "with transcripts": lambda b: transcripts(b, tok, step=0, kind="eval"),
        "with teacher KL": lambda b: transcripts(b, tok, step=0, kind="eval", kl_B_T=kl(student, b, 0)),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, record in cases.items():
                t0 = time.perf_counter()
                run(record)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["eval alone"])
    for name, v in times.items():
        print(f"{name:18s} median {statistics.median(v):.3f} s ({statistics.median(v) / base:.2f}x)  "
              f"runs {[round(x, 3) for x in v]}")


if __name__ == "__main__":
    main()
