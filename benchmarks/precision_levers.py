"""What lower precision and compilation buy mopd's on-policy distillation step on this CPU.

    .venv/bin/python benchmarks/precision_levers.py [--steps 10] [--warmup 3] [--rounds 3] [--compile]

The TRL comparison's step (benchmarks/trl_vs_mopd.py: 0.79M-parameter Qwen3 student, 2.77M teacher, batch 64,
8 completion tokens, `full_reverse_kl`, one torch thread) timed under each variant:

- `float32`: what `trl_vs_mopd.py` times for mopd;
- `mixed-bf16/sdpa`, `mixed-bf16/eager`: mopd's `dtype: bfloat16` (float32 student weights stepped under
  autocast, teacher held in bfloat16) with the default `sdpa` attention, and with `eager` attention;
- `pure-bf16/sdpa`, `pure-bf16/eager`: `master_weights: same` (student weights in bfloat16 too);
- with `--compile`, `pure-bf16/eager/compiled`: both models' forward through `torch.compile(dynamic=True)`;
  its compile time (the first step) is reported beside the steady-state step.

Also the two kernels that explain the result: a [1792, 128] x [128, 384] GEMM and the scaled-dot-product
attention forward + backward of one student layer, in float32 and bfloat16.

Each variant runs in a fresh subprocess; `--rounds` rounds visit the variants in a rotating order and the step
time is the median over all timed steps of all rounds. Writes the key "precision_levers" of
benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH, TOKENS = 64, 8
VARIANTS = ("float32", "mixed-bf16/sdpa", "mixed-bf16/eager", "pure-bf16/sdpa", "pure-bf16/eager")
COMPILED = "pure-bf16/eager/compiled"


def worker(variant: str, models: Path, steps: int, warmup: int) -> dict:
    import _common
    import torch

    from mopd.models.checkpoint import load_model
    from mopd.models.precision import compute_precision
    from mopd.models.tokenizer import build_char_tokenizer

    torch.set_num_threads(1)
    precision, _, rest = variant.partition("/")
    attn, _, compiled = rest.partition("/")
    compute = torch.float32 if precision == "float32" else torch.bfloat16
    weights = torch.bfloat16 if precision == "pure-bf16" else torch.float32
    student = load_model(models / "student", dtype=weights)
    teacher = load_model(models / "teacher0", dtype=compute)
    for m in (student, teacher):
        m.set_attn_implementation(attn or "sdpa")
        if compiled:
            m.forward = torch.compile(m.forward, dynamic=True)
    step = _common.mopd_step_fn(student, {"t": teacher}, build_char_tokenizer(_common.ALPHABET),
                                _common.mopd_settings(TOKENS, "full_reverse_kl"), {d: "t" for d in _common.DOMAINS})
    batch = _common.problems(BATCH * (warmup + steps), seed=0)
    times = []
    for i in range(warmup + steps):
        with compute_precision(torch.device("cpu"), compute, weights):
            times.append(_common.timed(lambda i=i: step(batch[i * BATCH : (i + 1) * BATCH], i)))
    return {"variant": variant, "first_step_s": round(times[0], 2), "step_ms": [round(t * 1000, 1) for t in times[warmup:]]}


def kernels() -> dict:
    """GEMM and attention kernels in float32 and bfloat16 (one thread), medians of 30 calls, microseconds."""
    import _common
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)

    def med(fn) -> float:
        for _ in range(3):
            fn()
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return round(_common.median(ts) * 1e6, 1)

    out = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(1792, 128, dtype=dt), torch.randn(128, 384, dtype=dt)
        q = torch.randn(BATCH, 4, 28, 32, dtype=dt, requires_grad=True)
        k = torch.randn(BATCH, 4, 28, 32, dtype=dt, requires_grad=True)
        v = torch.randn(BATCH, 4, 28, 32, dtype=dt, requires_grad=True)

        def attention(q=q, k=k, v=v) -> None:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        out[name] = {"gemm_1792x128x384_us": med(lambda a=a, b=b: a @ b), "sdpa_fwd_bwd_us": med(attention)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile variant (minutes)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.models, args.steps, args.warmup)))
        return
    import _common

    variants = list(VARIANTS) + ([COMPILED] if args.compile else [])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    env = {**os.environ, "PYTHONPATH": str(HERE), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        _common.build_models(Path(tmp), n_teachers=1)
        for r in range(args.rounds):
            for v in variants[r % len(variants):] + variants[: r % len(variants)]:
                cmd = [sys.executable, __file__, "--worker", v, "--models", tmp, "--steps", str(args.steps),
                       "--warmup", str(args.warmup)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(f"{v} failed:\n{proc.stderr[-3000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[v].append(res)
                print(f"round {r} {v:26s} median {_common.median(res['step_ms']):7.1f} ms  "
                      f"first step {res['first_step_s']} s", flush=True)
    base = _common.median([t for x in runs["float32"] for t in x["step_ms"]])
    summary = {}
    for v, rs in runs.items():
        ms = _common.median([t for x in rs for t in x["step_ms"]])
        summary[v] = {"step_ms": round(ms, 1), "completions_per_s": round(BATCH * 1000 / ms, 1),
                      "speedup_vs_float32": round(base / ms, 2),
                      "first_step_s": round(_common.median([x["first_step_s"] for x in rs]), 1)}
    result = {"command": "python benchmarks/precision_levers.py " + " ".join(sys.argv[1:]),
              "settings": {"batch": BATCH, "completion_tokens": TOKENS, "objective": "full_reverse_kl",
                           "threads": 1, "timed_steps_per_run": args.steps, "rounds": args.rounds},
              "median": summary, "kernels": kernels(), "runs": runs}
    print(json.dumps({"median": summary, "kernels": result["kernels"]}, indent=2))
    from trl_vs_mopd import update_results

    update_results("precision_levers", result)


if __name__ == "__main__":
    main()
