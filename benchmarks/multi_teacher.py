"""What routing to three teachers costs: a 3-teacher MOPD step against a 1-teacher step at equal batch.

    .venv/bin/python benchmarks/multi_teacher.py [--steps 15] [--objective sampled] [--threads 1]

One process holds both setups (same student weights, batch 64 over the three domains, 8 completion tokens);
steps alternate between them so machine load hits both alike. With three teachers each scores only the rows
of its own domain, so the teacher FLOPs are those of one teacher on the whole batch; the cost is one teacher
call per teacher instead of one. Writes benchmarks/results.json (key "multi_teacher").
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import _common
import torch
from trl_vs_mopd import update_results

from mopd.models.checkpoint import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15, help="timed steps per setup")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--objective", default="sampled")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _common.build_models(Path(tmp), n_teachers=3)
        tok = _common.build_char_tokenizer(_common.ALPHABET)
        student = load_model(paths["student"])
        teachers = {f"teacher{i}": load_model(paths[f"teacher{i}"]) for i in range(3)}
    settings = _common.mopd_settings(args.tokens, args.objective)
    one = _common.mopd_step_fn(copy.deepcopy(student), {"teacher0": teachers["teacher0"]}, tok, settings,
                               {d: "teacher0" for d in _common.DOMAINS})
    three = _common.mopd_step_fn(copy.deepcopy(student), teachers, tok, settings,
                                 {d: f"teacher{i}" for i, d in enumerate(_common.DOMAINS)})
    n = args.warmup + args.steps
    batches = _common.problems(64 * n)
    times: dict[str, list[float]] = {"1 teacher": [], "3 teachers": []}
    for i in range(n):
        batch = batches[i * 64 : (i + 1) * 64]
        order = [("1 teacher", one), ("3 teachers", three)]
        for name, step in order if i % 2 else order[::-1]:
            t = _common.timed(lambda step=step, batch=batch, i=i: step(batch, i))
            if i >= args.warmup:
                times[name].append(t)
    med = {k: _common.median(v) for k, v in times.items()}
    result = {
        "command": "python benchmarks/multi_teacher.py " + " ".join(sys.argv[1:]),
        "machine": _common.machine(),
        "settings": {"batch": 64, "completion_tokens": args.tokens, "objective": args.objective,
                     "threads": args.threads, "timed_steps_each": args.steps},
        "median_step_ms": {k: round(1000 * v, 1) for k, v in med.items()},
        "ratio_3_over_1": round(med["3 teachers"] / med["1 teacher"], 3),
        "step_ms": {k: [round(1000 * t, 1) for t in v] for k, v in times.items()},
    }
    print(result["median_step_ms"], "ratio", result["ratio_3_over_1"])
    update_results("multi_teacher", result)


if __name__ == "__main__":
    main()
