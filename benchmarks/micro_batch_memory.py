"""What `micro_batch_size` buys: the peak memory of a full-vocabulary MOPD step, whole batch against micro-batches.

    .venv/bin/python benchmarks/micro_batch_memory.py [--vocab 32768] [--rollouts 128] [--micro 64 32 16]
                                                      [--rounds 3] [--steps 3] [--threads 1]

The TRL-comparison models (student 0.79M / teacher 2.77M parameters at 47 tokens) with a real-size vocabulary
(32k by default), `objective: full_reverse_kl` (the objective with the most per-token state: the student's and the
teacher's [rows, positions, V] logits), 128 rollouts of 8 tokens a step, one teacher. Each variant runs in a fresh
subprocess (rounds alternate the order): a warm-up step, then `--steps` timed ones. Reported per variant, medians
over rounds: the process's peak RSS, the peak above the RSS it had before its first step (the step's own
working memory: activations, logits, gradients, AdamW state), and the step time. The gradients themselves are
checked equal in tests/test_micro_batches.py. Writes benchmarks/results.json (key "micro_batch_memory").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMPLETION_TOKENS = 8


def _rss_mib() -> float:
    """Current resident set size (Linux /proc; the benchmark machines are Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    import _common
    import torch

    from mopd.models.checkpoint import load_model
    from mopd.models.tokenizer import build_char_tokenizer

    torch.set_num_threads(args.threads)
    tok = build_char_tokenizer(_common.ALPHABET)
    student, teacher = load_model(args.models / "student"), load_model(args.models / "teacher0")
    settings = _common.mopd_settings(COMPLETION_TOKENS, "full_reverse_kl").model_copy(
        update={"micro_batch_size": args.micro_size or None})
    step = _common.mopd_step_fn(student, {"teacher0": teacher}, tok, settings, {d: "teacher0" for d in _common.DOMAINS})
    batches = [_common.problems(args.rollouts, seed=100 + i) for i in range(args.steps + 1)]
    before = _rss_mib()
    step(batches[0], 0)  # warm-up (AdamW state is created here)
    times = [_common.timed(lambda i=i: step(batches[i], i)) for i in range(1, args.steps + 1)]
    peak = _common.peak_rss_mib()
    print(json.dumps({"micro": args.micro_size, "peak_rss_mib": round(peak, 1), "rss_before_mib": round(before, 1),
                      "step_peak_above_start_mib": round(peak - before, 1),
                      "step_ms": round(1000 * _common.median(times), 1)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--rollouts", type=int, default=128)
    ap.add_argument("--micro", type=int, nargs="+", default=[64, 32, 16], help="micro-batch sizes (rollouts)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--micro-size", dest="micro_size", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import _common
    import torch
    from trl_vs_mopd import update_results

    from mopd.models.tokenizer import build_char_tokenizer

    variants = [0, *args.micro]  # 0 = the whole batch at once
    runs: dict[int, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        tok = build_char_tokenizer(_common.ALPHABET)
        _common.build_tiny_model(_common.STUDENT, args.vocab, tok, seed=0).save_pretrained(models / "student")
        _common.build_tiny_model(_common.TEACHER, args.vocab, tok, seed=1).save_pretrained(models / "teacher0")
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            for v in order:
                cmd = [sys.executable, __file__, "--worker", "--models", str(models), "--micro-size", str(v),
                       "--rollouts", str(args.rollouts), "--steps", str(args.steps), "--threads", str(args.threads)]
                env = {**os.environ, "PYTHONPATH": str(HERE), "TOKENIZERS_PARALLELISM": "false"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(f"micro {v} failed:\n{proc.stderr[-3000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[v].append(res)
                label = "whole batch" if v == 0 else f"micro {v}"
                print(f"round {r} {label:12s} peak RSS {res['peak_rss_mib']:7.1f} MiB "
                      f"(+{res['step_peak_above_start_mib']:.1f} over the start)  step {res['step_ms']:.0f} ms",
                      flush=True)

    def med(v: int, key: str) -> float:
        return round(_common.median([x[key] for x in runs[v]]), 1)

    whole = med(0, "step_peak_above_start_mib")
    summary = {("whole batch" if v == 0 else f"micro_batch_size {v}"): {
        "peak_rss_mib": med(v, "peak_rss_mib"), "step_peak_above_start_mib": med(v, "step_peak_above_start_mib"),
        "step_ms": med(v, "step_ms"),
        "step_memory_vs_whole": round(med(v, "step_peak_above_start_mib") / whole, 3) if whole > 0 else None,
        "step_time_vs_whole": round(med(v, "step_ms") / med(0, "step_ms"), 3),
    } for v in variants}
    print(json.dumps(summary, indent=2))
    update_results("micro_batch_memory", {
        "command": "python benchmarks/micro_batch_memory.py " + " ".join(sys.argv[1:]),
        "machine": _common.machine(), "torch": torch.__version__,
        "settings": {"vocab": args.vocab, "rollouts": args.rollouts, "completion_tokens": COMPLETION_TOKENS,
                     "objective": "full_reverse_kl", "rounds": args.rounds, "timed_steps": args.steps,
                     "threads": args.threads},
        "median": summary, "runs": {str(v): rs for v, rs in runs.items()},
    })


if __name__ == "__main__":
    main()
