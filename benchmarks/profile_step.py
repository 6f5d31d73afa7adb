"""Where one mopd training step spends its time: phases (cProfile) and the heaviest torch ops (torch.profiler).

    .venv/bin/python benchmarks/profile_step.py [--teachers 1] [--objective sampled] [--steps 6] [--threads 1]

The step is the real one (`_common.mopd_step_fn`: rollout, policy_loss with a TeacherPanel, backward, clip, AdamW) on
the TRL-comparison models (student 0.79M, teachers 2.77M parameters), batch 64, 8 completion tokens.
Phases are cumulative times of the functions that implement them, as shares of the step; the op table says
whether a phase is bound by matrix multiplies (useful work) or by elementwise/Python overhead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

import _common
import torch
from torch.profiler import ProfilerActivity, profile

from mopd.models.checkpoint import load_model

PHASES = {  # phase -> (file suffix, function name) whose cumulative time it is
    "sample (student, KV-cached)": ("sampling/sampler.py", "sample"),
    "teacher scoring": ("teachers/panel.py", "sampled_logprobs"),
    "teacher scoring (full logits)": ("teachers/panel.py", "full_logits"),
    "backward": ("torch/_tensor.py", "backward"),
    "optimizer step": ("torch/optim/optimizer.py", "wrapper"),
    "rollout + policy_loss (before backward)": ("benchmarks/_common.py", "policy_step"),
}


def phase_times(stats: pstats.Stats) -> dict[str, float]:
    out = {}
    for phase, (suffix, fn) in PHASES.items():
        out[phase] = sum(v[3] for (file, _line, name), v in stats.stats.items()  # type: ignore[attr-defined]
                         if file.endswith(suffix) and name == fn)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teachers", type=int, default=1)
    ap.add_argument("--objective", default="sampled")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _common.build_models(Path(tmp), n_teachers=args.teachers)
        tok = _common.build_char_tokenizer(_common.ALPHABET)
        student = load_model(paths["student"])
        teachers = {f"teacher{i}": load_model(paths[f"teacher{i}"]) for i in range(args.teachers)}
    routes = {d: f"teacher{i % args.teachers}" for i, d in enumerate(_common.DOMAINS)}
    step = _common.mopd_step_fn(student, teachers, tok, _common.mopd_settings(args.tokens, args.objective), routes)
    batches = _common.problems(64 * (2 + 2 * args.steps))
    feed = iter(range(len(batches) // 64))

    def one() -> None:
        i = next(feed)
        step(batches[i * 64 : (i + 1) * 64], i)

    for _ in range(2):  # warm-up: first-call allocations and lazy imports
        one()
    prof = cProfile.Profile()
    prof.enable()
    total = sum(_common.timed(one) for _ in range(args.steps))
    prof.disable()
    phases = phase_times(pstats.Stats(prof))
    print(f"step: {1000 * total / args.steps:.1f} ms (under cProfile), {args.teachers} teacher(s), "
          f"objective {args.objective}, {torch.get_num_threads()} thread(s)")
    for name, t in phases.items():
        if t:
            print(f"  {name:42s} {100 * t / total:5.1f} %")
    with profile(activities=[ProfilerActivity.CPU]) as tp:
        for _ in range(args.steps):
            one()
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
