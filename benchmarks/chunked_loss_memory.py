"""What `logit_chunk` buys at Qwen3's vocabulary: a full-vocabulary reverse-KL step, unchunked against chunked.

    .venv/bin/python benchmarks/chunked_loss_memory.py [--rows 8] [--completion 256] [--chunks 0 32]
                                                       [--steps 2] [--threads 2]

A Qwen3-architecture student (vocab_size 151,936, hidden 64, 2 layers, tied embeddings: ~10M parameters, nearly
all of them the embedding) and a teacher about 3x its size (hidden 192), random weights; `rows` rows of a 16-token
prompt and `completion` completion tokens (random ids, every row routed to the one teacher). One step is
`learner.policy.policy_loss` with `objective: full_reverse_kl` and its backward (no optimizer): the student's and
the teacher's forward, the per-token KL over the full vocabulary and the gradient. Each variant (`--chunks`: 0 =
one block, the unchunked computation; N = blocks of N positions) runs in a fresh subprocess, so the peak RSS
(ru_maxrss) is that variant's: a warm-up step, then `--steps` timed ones (median). Prints one JSON line per
variant and one summary line. The chunked loss and gradient equal the unchunked ones to float rounding
(tests/test_chunked_objectives.py); this measures only time and memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VOCAB = 151_936
PROMPT = 16


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from mopd.core.batch import rollout_batch
    from mopd.core.schema import MOPDStage
    from mopd.learner.objective_table import PolicyConfig
    from mopd.learner.policy import policy_loss
    from mopd.teachers.panel import TeacherPanel

    torch.set_num_threads(args.threads)

    def qwen3(hidden: int, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                          max_position_embeddings=PROMPT + args.completion + 8, tie_word_embeddings=True)
        return Qwen3ForCausalLM(cfg)

    student, teacher = qwen3(64, 0), qwen3(192, 1).eval().requires_grad_(False)
    chunk = args.chunk or None
    panel = TeacherPanel(models={"t": teacher}, teacher_of_domain={"d": "t"}, logit_chunk=chunk)
    settings = MOPDStage(kind="mopd", init="x", steps=1, teachers={"d": "t"}, objective="full_reverse_kl",
                         max_new_tokens=args.completion, logit_chunk=chunk)
    cfg = PolicyConfig(sampling=settings, distill=settings, teachers=panel)
    g = torch.Generator().manual_seed(0)
    rows, n = args.rows, args.completion
    batch = rollout_batch(
        torch.randint(3, VOCAB, (rows, PROMPT), generator=g), torch.ones(rows, PROMPT, dtype=torch.long),
        torch.randint(3, VOCAB, (rows, n), generator=g), -torch.rand(rows, n, generator=g), torch.ones(rows, n),
        prompts=[""] * rows, completions=[""] * rows, domains=["d"] * rows,
    ).with_rewards(torch.zeros(rows))

    def step() -> float:
        student.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss, _ = policy_loss(student, batch, cfg, temperature=1.0, logit_chunk=chunk)
        loss.backward()
        return time.perf_counter() - start

    before = _peak_rss_mib()
    step()  # warm-up
    times = [step() for _ in range(args.steps)]
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(json.dumps({
        "chunk": chunk, "rows": rows, "completion": n, "vocab": VOCAB,
        "student_params_m": round(params(student) / 1e6, 2), "teacher_params_m": round(params(teacher) / 1e6, 2),
        "step_s": round(statistics.median(times), 2), "peak_rss_mib": round(_peak_rss_mib(), 1),
        "peak_rss_before_step_mib": round(before, 1), "threads": args.threads,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 32], help="0 = unchunked (one block)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args()
    if args.chunk is not None:
        worker(args)
        return
    results = []
    for chunk in args.chunks:
        cmd = [sys.executable, __file__, "--chunk", str(chunk), "--rows", str(args.rows), "--completion",
               str(args.completion), "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)
        results.append(json.loads(out))
    base = results[0]
    print(json.dumps({"benchmark": "chunked_loss_memory", "variants": results, **{
        f"chunk_{r['chunk']}_vs_first": {"rss_ratio": round(r["peak_rss_mib"] / base["peak_rss_mib"], 3),
                                         "time_ratio": round(r["step_s"] / base["step_s"], 3)}
        for r in results[1:]
    }}))


if __name__ == "__main__":
    main()
