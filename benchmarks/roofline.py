"""Roofline: this machine's measured float32 GEMM peak, and the FLOP/s that training steps reach on the demo's
model shape (hidden 128, 2 layers, 0.40M parameters: every stage of src/mopd/recipes/demo.yaml has it), and on
the TRL comparison's models (whose FLOPs per step bound how fast any tool doing the same work can be).

    .venv/bin/python benchmarks/roofline.py [--threads 1] [--steps 10]

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matrix multiplies and attention, forward and
backward; elementwise ops count zero), over one step, then divided by the median wall time of steps run
without the counter. Steps: the demo's MOPD step (batch 64, 12 completion tokens, three teachers of the same
shape, sampled-token objective), its pretraining step (batch 64, supervised), and the step that
benchmarks/trl_vs_mopd.py times. For that last step it also splits the FLOPs by phase (sampling, teacher
scoring, the student's training forward, backward), reads the share of real (non-padding) tokens, and times the
step's matrix multiplies under `torch.profiler` to give the GFLOP/s its GEMMs reach: together they say whether
a faster step needs faster kernels or less arithmetic. Writes benchmarks/results.json (key "roofline").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import _common
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from trl_vs_mopd import update_results

import mopd.learner.policy as learner_policy
from mopd.learner.supervised import supervised_loss
from mopd.models.checkpoint import load_model
from mopd.teachers.panel import TeacherPanel

GEMM_OPS = ("mm", "addmm", "bmm")  # matrix-multiply kernels, as both the flop counter and the profiler name them
TRL_STEP = "TRL-comparison step (student 0.79M, 1 teacher 2.77M, 64 x 8 tokens)"


def gemm_peak(n: int, seconds: float = 1.0) -> float:
    """float32 GFLOP/s of an n x n x n matmul, best of repeated timings."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    reps = max(1, int(seconds * 1e11 / (2 * n**3)) // 10)
    for _ in range(10):
        t = _common.timed(lambda: [a @ b for _ in range(reps)])
        best = max(best, 2 * n**3 * reps / t / 1e9)
    return best


def step_gflop(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def phase_breakdown(step: Callable[[list, int], object], batch: list, seed: int) -> dict[str, float]:
    """GFLOP of one step by phase, and the share of real tokens in the rows the student trains on.

    The phases are read by counting around the functions that implement them (the student's differentiable
    forward, the teacher panel, backward); sampling is the rest of the step (the verifier and the loss arithmetic
    count zero).
    """
    counter = FlopCounterMode(display=False)
    gflop: dict[str, float] = {}
    real: list[float] = []

    def counted(label: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            before = counter.get_total_flops()
            out = fn(*args, **kwargs)
            gflop[label] = gflop.get(label, 0.0) + (counter.get_total_flops() - before) / 1e9
            if label == "student training forward":
                real.append(float(args[1].attention_mask_B_T.float().mean()))  # of the rows the student trains on
            return out
        return wrapper

    with (mock.patch.object(learner_policy, "student_scores",
                            counted("student training forward", learner_policy.student_scores)),
          mock.patch.object(TeacherPanel, "sampled_logprobs",
                            counted("teacher scoring", TeacherPanel.sampled_logprobs)),
          mock.patch.object(torch.Tensor, "backward", counted("backward", torch.Tensor.backward)),
          counter):
        step(batch, seed)
    total = counter.get_total_flops() / 1e9
    return {"sampling (prefill + KV-cached decode)": round(total - sum(gflop.values()), 3),
            **{k: round(v, 3) for k, v in gflop.items()}, "real_token_fraction": round(real[0], 3)}


def gemm_rate(step: Callable[[list, int], object], problems: list, first: int, n: int) -> dict[str, float]:
    """The step's matrix multiplies: their share of its time under the profiler, and their GFLOP/s."""
    with FlopCounterMode(display=False) as counter:
        step(problems[first * 64 : (first + 1) * 64], first)
    flops = {str(op).split(".")[1]: v for op, v in counter.get_flop_counts()["Global"].items()}
    gemm_flop = sum(v for op, v in flops.items() if op in GEMM_OPS)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(first + 1, first + 1 + n):
            step(problems[i * 64 : (i + 1) * 64], i)
    events, gemm_keys = prof.key_averages(), {f"aten::{op}" for op in GEMM_OPS}
    gemm_us = sum(e.self_cpu_time_total for e in events if e.key in gemm_keys) / n
    total_us = sum(e.self_cpu_time_total for e in events) / n
    return {"gemm_share_of_step": round(gemm_us / total_us, 3),
            "gemm_gflop_s": round(gemm_flop / (gemm_us * 1e-6) / 1e9, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peaks = {n: round(gemm_peak(n), 1) for n in (256, 512, 1024, 2048)}
    print("fp32 GEMM GFLOP/s by size:", peaks, flush=True)

    tok = _common.build_char_tokenizer(_common.ALPHABET)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(4):
            _common.build_tiny_model(_common.DEMO_MODEL, len(tok), tok, seed=i).save_pretrained(Path(tmp) / f"m{i}")
        student, *teachers = (load_model(Path(tmp) / f"m{i}") for i in range(4))
        bench = _common.build_models(Path(tmp) / "bench", n_teachers=1)
        bench_step = _common.mopd_step_fn(load_model(bench["student"]), {"t": load_model(bench["teacher0"])}, tok,
                                          _common.mopd_settings(8, "sampled"), {d: "t" for d in _common.DOMAINS})
    n_params = sum(p.numel() for p in student.parameters())
    mopd_step = _common.mopd_step_fn(student, {f"t{i}": t for i, t in enumerate(teachers)}, tok,
                                     _common.mopd_settings(12, "sampled"),
                                     {d: f"t{i}" for i, d in enumerate(_common.DOMAINS)})
    problems = _common.problems(64 * (args.steps + 8))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)

    def pretrain_step(batch) -> None:
        loss, _ = supervised_loss(student, tok, batch, loss_on_prompt=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps = {"mopd (3 teachers, 64 x 12 tokens)": lambda b, i: mopd_step(b, i),
             "pretrain (64 sequences)": lambda b, i: pretrain_step(b),
             TRL_STEP: bench_step}
    out = {}
    for name, fn in steps.items():
        batch0 = problems[:64]
        fn(batch0, 0)  # warm-up
        gflop = step_gflop(lambda fn=fn, b=batch0: fn(b, 1))
        times = [_common.timed(lambda fn=fn, i=i: fn(problems[i * 64 : (i + 1) * 64], i))
                 for i in range(2, 2 + args.steps)]
        t = _common.median(times)
        out[name] = {"gflop_per_step": round(gflop, 3), "median_step_ms": round(1000 * t, 1),
                     "achieved_gflop_s": round(gflop / t, 1),
                     "fraction_of_peak": round(gflop / t / max(peaks.values()), 3)}
        print(name, out[name], flush=True)
    name = TRL_STEP
    out[name]["gflop_by_phase"] = phase_breakdown(bench_step, problems[:64], 2 + args.steps)
    out[name].update(gemm_rate(bench_step, problems, 3 + args.steps, 4))
    peak = max(peaks.values())
    # the fastest any tool doing this arithmetic could go, and with every padding token removed
    out[name]["completions_per_s_at_peak"] = round(64 / (out[name]["gflop_per_step"] / peak), 1)
    out[name]["completions_per_s_at_peak_without_padding"] = round(
        64 / (out[name]["gflop_per_step"] * out[name]["gflop_by_phase"]["real_token_fraction"] / peak), 1)
    print(name, out[name], flush=True)
    update_results("roofline", {
        "command": "python benchmarks/roofline.py " + " ".join(sys.argv[1:]),
        "machine": _common.machine(),
        "threads": args.threads, "gemm_peak_gflop_s": peaks, "demo_model_parameters": n_params, "steps": out,
    })


if __name__ == "__main__":
    main()
