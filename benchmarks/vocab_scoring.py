"""What skipping the prompt's vocabulary projection saves at a real vocabulary size.

    .venv/bin/python benchmarks/vocab_scoring.py [--vocab 32768] [--reps 7] [--threads 1]

The TRL-comparison models (hidden 128 / 256) with a 32k vocabulary, batch 64, prompts of the three domains
plus 8 sampled tokens. Interleaved, medians:
- teacher scoring: full-sequence logits then `token_logprobs` (what the panel did before issue 5) against
  `TeacherPanel.sampled_logprobs` (logits only for positions that predict a completion token);
- the teacher's full distributions for the full-vocabulary objectives (`TeacherPanel.full_logits`, then the
  log-softmax every such loss takes): every position against the completion window;
- sampler prefill: the prompt forward with logits for every position against `logits_to_keep=1`;
- the learner's differentiable logprobs + backward (`learner.policy.student_scores`): full-sequence logits against the
  completion window.
Writes benchmarks/results.json (key "vocab_scoring").
"""

from __future__ import annotations

import argparse
import sys

import _common
import torch
from trl_vs_mopd import update_results

from mopd.core.logprobs import token_logprobs
from mopd.models.forward import position_ids_from_mask, sequence_logits
from mopd.sampling.sampler import encode_prompts, sample
from mopd.teachers.panel import TeacherPanel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = _common.build_char_tokenizer(_common.ALPHABET)
    student = _common.build_tiny_model(_common.STUDENT, args.vocab, tok, seed=0).eval()
    teacher = _common.build_tiny_model(_common.TEACHER, args.vocab, tok, seed=1).eval()
    problems = _common.problems(64)
    batch = sample(student, tok, [p.prompt for p in problems], max_new_tokens=8,
                   generator=torch.Generator().manual_seed(0), domains=[p.domain for p in problems])
    panel = TeacherPanel(models={"t": teacher}, teacher_of_domain={d: "t" for d in _common.DOMAINS})
    names = panel.route(batch)
    ids, mask = batch.input_ids_B_T, batch.attention_mask_B_T
    prompt_ids, prompt_mask = encode_prompts(tok, [p.prompt for p in problems])

    @torch.no_grad()
    def score_full() -> torch.Tensor:
        return token_logprobs(sequence_logits(teacher, ids, mask), ids) * batch.completion_mask_B_T

    @torch.no_grad()
    def prefill(keep: int) -> None:
        student(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                use_cache=True, logits_to_keep=keep)

    assert torch.allclose(score_full(), panel.sampled_logprobs(batch, names), atol=1e-4)
    student.train()
    keep = ids.shape[1] - int(batch.completion_mask_B_T.any(0).long().argmax()) + 1

    def student_pass(k: int) -> None:
        """The learner's differentiable logprobs of the sampled tokens, then backward."""
        lp = token_logprobs(sequence_logits(student, ids, mask, logits_to_keep=k), ids[:, ids.shape[1] - k :]
                            if k else ids)
        (lp * batch.completion_mask_B_T[:, -lp.shape[1] :]).sum().backward()

    cases = {
        "teacher scoring, full-sequence logits (before)": score_full,
        "teacher scoring, completion window (after)": lambda: panel.sampled_logprobs(batch, names),
        "teacher full logits + log-softmax, every position (before)":
            lambda: panel.full_logits(batch, names).log_softmax(-1),
        "teacher full logits + log-softmax, completion window (after)":
            lambda: panel.full_logits(batch, names, keep - 1).log_softmax(-1),
        "sampler prefill, logits for every prompt position (before)": lambda: prefill(0),
        "sampler prefill, logits_to_keep=1 (after)": lambda: prefill(1),
        "student logprobs + backward, full-sequence logits (before)": lambda: student_pass(0),
        "student logprobs + backward, completion window (after)": lambda: student_pass(keep),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.reps + 1):
        for name, fn in cases.items():
            times[name].append(_common.timed(fn))
    med = {k: round(1000 * _common.median(v[1:]), 1) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:60s} {v:8.1f} ms")
    update_results("vocab_scoring", {
        "command": "python benchmarks/vocab_scoring.py " + " ".join(sys.argv[1:]),
        "vocab": args.vocab, "batch_shape": list(ids.shape), "threads": args.threads, "median_ms": med,
    })


if __name__ == "__main__":
    main()
