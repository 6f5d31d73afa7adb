"""Accelerator memory of a MOPD step with teachers resident beside the student or kept on the host.

    .venv/bin/python benchmarks/offload_memory.py [--shape qwen3-0.6b] [--teachers 3] [--batch 8] [--new-tokens 64]

The figure issue 6 asks for: with `teacher_device: cpu` the accelerator holds the student plus the largest
teacher, not the sum of the teachers. Three fresh subprocesses each take `--steps` real MOPD steps
(rollout, then `policy_loss` with a `TeacherPanel`, `full_reverse_kl`, backward, AdamW) in mopd's mixed
precision (float32 student weights under bfloat16 autocast, bfloat16 teachers) and report
`torch.cuda.max_memory_allocated`:

- `resident`: every teacher on the accelerator (`teacher_device: same`);
- `offloaded`: every teacher in host memory, moved in only to score its rows (`teacher_device: cpu`);
- `one-teacher`: a single resident teacher, the bound the offloaded run should meet.

The models are built from a config with random weights (no download): `qwen3-0.6b` has the shape of
Qwen/Qwen3-0.6B (28 layers, hidden 1024, vocabulary 151,936), `tiny` the shape of the speed benchmark. Without
CUDA the same steps run on CPU and the figure is each process's peak RSS instead, which shows the script works
and says nothing about the bound. Writes the key "offload_memory[/<shape>]" of benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=47, max_position_embeddings=256),
}
MODES = ("resident", "offloaded", "one-teacher")


def build(shape: str, tokenizer, seed: int, dtype):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(**SHAPES[shape], tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = Qwen3ForCausalLM(cfg)
    for p in model.parameters():  # parameters only: the float32 RoPE frequencies stay float32, as mopd places them
        p.data = p.data.to(dtype)
    return model


def worker(mode: str, shape: str, teachers: int, batch: int, new_tokens: int, steps: int) -> dict:
    """Take `steps` MOPD steps in `mode` and return the peak memory and the bytes of each model."""
    import _common
    import torch

    from mopd.models.precision import compute_precision, training_attention
    from mopd.models.tokenizer import build_char_tokenizer
    from mopd.teachers.panel import TeacherPanel

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    compute = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
    tok = build_char_tokenizer(_common.ALPHABET)
    n = 1 if mode == "one-teacher" else teachers
    home = torch.device("cpu") if mode == "offloaded" else device
    panel_models = {f"t{i}": build(shape, tok, 1 + i, compute).to(home).eval().requires_grad_(False)
                    for i in range(n)}
    student = training_attention(build(shape, tok, 0, torch.float32).to(device), device, compute)
    panel = TeacherPanel(models=panel_models,
                         teacher_of_domain={d: f"t{i % n}" for i, d in enumerate(_common.DOMAINS)},
                         compute_device=device if mode == "offloaded" else None)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.9, 0.99), weight_decay=0.0)
    settings = _common.mopd_settings(new_tokens, "full_reverse_kl")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps):
        with compute_precision(device, compute, torch.float32):
            loss, _ = _common.policy_step(student, tok, _common.problems(batch, seed=step), settings,
                                          torch.Generator().manual_seed(step), panel)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    return {
        "mode": mode, "device": str(device), "teachers": n,
        "peak_mib": round((torch.cuda.max_memory_allocated(device) if cuda else 0) / 2**20, 1),
        "peak_rss_mib": round(_common.peak_rss_mib(), 1),
        "student_mib": round(size(student) / 2**20, 1),
        "teacher_mib": round(max(size(m) for m in panel_models.values()) / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="qwen3-0.6b")
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shape, args.teachers, args.batch, args.new_tokens, args.steps)))
        return
    env = {**os.environ, "PYTHONPATH": str(HERE), "TOKENIZERS_PARALLELISM": "false"}
    runs = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--worker", mode, "--shape", args.shape, "--teachers", str(args.teachers),
               "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(runs[mode]), flush=True)
    key = "peak_mib" if runs["resident"]["device"].startswith("cuda") else "peak_rss_mib"
    result = {
        "command": "python benchmarks/offload_memory.py " + " ".join(sys.argv[1:]),
        "figure": key,
        "runs": runs,
        "offloaded_over_one_teacher": round(runs["offloaded"][key] / runs["one-teacher"][key], 3),
        "offloaded_over_resident": round(runs["offloaded"][key] / runs["resident"][key], 3),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    from trl_vs_mopd import update_results

    update_results("offload_memory" if args.shape == "qwen3-0.6b" else f"offload_memory/{args.shape}", result)


if __name__ == "__main__":
    main()
