"""The roofline bound of one MOPD step at each of `real_shape_run.py`'s shapes: the step's GEMM FLOPs at the best
float32 GEMM rate this CPU reaches, so that the gap between a measured step and the physical limit is known.

    .venv/bin/python benchmarks/real_shape_bound.py [--threads 2] [--prompt 40] [--out FILE]

FLOPs are the matrix multiplies of the least work the step must do, counted from the models (each linear layer's
2 x in x out per token; attention's scores and weighted sums, 4 x positions x width per token and layer):

- sampling: the student's prefill of the prompts (decoder only, the head at the last position) and its decode of
  every completion token (decoder and head);
- teacher scoring: the teacher's decoder over prompt and completion, its head at the completion positions;
- student training: its decoder over prompt and completion and its head at the completion positions, forward
  and backward (backward = 2 x forward: the input and the weight gradients).

Completions are `completion` tokens (the `toy` shape's vary: its measured mean length is used when
results.json has it, else the maximum); prompts `--prompt` tokens (the benchmarks' 16-64, mean 40). The GEMM rate
is the best of [N, H] x [H, V] products at the shapes' own widths and vocabularies (forward, input gradient,
weight gradient; N = 2,048 rows), measured here: nothing a step does runs faster than that on this CPU. Reads the measured steps from results.json
(`real_shape/users`, `real_shape/users-smol`) and writes key "real_shape/bound".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from real_shape import RESULTS, save_result  # noqa: E402
from real_shape_run import SHAPES, models_for  # noqa: E402


def decoder_flops(cfg, tokens: float, context: float) -> float:
    """Forward FLOPs of the decoder layers (no embedding, no head) over `tokens` tokens at mean context `context`."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    linear = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter  # q, o; k, v; gate, up, down
    attention = 2 * heads * hd * context * 2  # scores and weighted sum
    return 2 * tokens * layers * linear + tokens * layers * attention


def step_flops(student, teacher, rows: int, prompt: float, completion: float) -> dict:
    V = student.vocab_size
    tokens, ctx = rows * (prompt + completion), prompt + completion / 2
    head_s, head_t = 2 * student.hidden_size * V, 2 * teacher.hidden_size * V
    sampling = decoder_flops(student, rows * (prompt + completion), ctx) + head_s * rows * (1 + completion)
    teacher_scoring = decoder_flops(teacher, tokens, ctx) + head_t * rows * completion
    training = 3 * (decoder_flops(student, tokens, ctx) + head_s * rows * completion)
    return {"sampling": sampling, "teacher_scoring": teacher_scoring, "student_training": training,
            "total": sampling + teacher_scoring + training}


def gemm_rate(widths: set[int], vocabs: set[int], rows: int = 2048) -> float:
    """The best GFLOP/s of the head's three products at these shapes (a few repetitions each)."""
    import torch

    best = 0.0
    for H in sorted(widths):
        for V in sorted(vocabs):
            w, x, g = torch.randn(V, H), torch.randn(rows, H), torch.randn(rows, V)
            for left, right in ((x, w.T), (g, w), (g.T, x)):
                torch.mm(left, right)
                t0 = time.perf_counter()
                for _ in range(3):
                    torch.mm(left, right)
                best = max(best, 3 * 2 * rows * H * V / (time.perf_counter() - t0) / 1e9)
    return best


def main() -> None:
    import torch
    from transformers import AutoConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=float, default=40.0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import _common

    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    measured = {**stored.get("real_shape/users", {}).get("shapes", {}),
                **stored.get("real_shape/users-smol", {}).get("shapes", {})}
    shapes, widths, vocabs = {}, set(), set()
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            models = models_for(name, Path(tmp))
            s, t = AutoConfig.from_pretrained(models / "student"), AutoConfig.from_pretrained(models / "teacher0")
            lengths = [r.get("length_mean") for r in measured.get(name, {}).get("runs", {}).get("mopd", [])
                       if r.get("length_mean")]
            completion = sorted(lengths)[len(lengths) // 2] if lengths else shape["completion"]
            shapes[name] = {"rows": shape["batch"], "prompt": a.prompt, "completion": completion,
                            **step_flops(s, t, shape["batch"], a.prompt, completion)}
            widths |= {s.hidden_size, t.hidden_size}
            vocabs.add(s.vocab_size)
    rate = gemm_rate(widths, vocabs)
    for v in shapes.values():
        v["bound_s"] = round(v["total"] / (rate * 1e9), 2)
        v["bound_completions_per_s"] = round(v["rows"] / v["bound_s"], 2)
        users = measured.get(next(k for k, x in shapes.items() if x is v), {}).get("median", {})
        for tool, m in users.items():
            if m.get("step_s"):
                v[f"{tool}_fraction_of_bound"] = round(v["bound_s"] / m["step_s"], 3)
    result = {"command": "python benchmarks/real_shape_bound.py " + " ".join(sys.argv[1:]),
              "machine": _common.machine(), "threads": a.threads, "gemm_gflops": round(rate, 1), "shapes": shapes}
    print(json.dumps(result, indent=1))
    save_result(result, "real_shape/bound", a.out)


if __name__ == "__main__":
    main()
