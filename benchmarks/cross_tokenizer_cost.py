"""What a teacher of another tokenizer costs: one MOPD step's loss and backward, same-tokenizer against cross.

    .venv/bin/python benchmarks/cross_tokenizer_cost.py [--batch 64] [--reps 7]

The demo's shapes (0.4M-parameter student and teacher, its three domains, completions of up to 10 tokens): a
batch of `--batch` rows whose completions are the domains' reference answers (so a BPE teacher's merges apply, as
they would to a trained student's text), then, on the same batch and weights:

* same: the teacher in process, reading the student's token ids (the path every same-tokenizer run takes);
* cross, same tokenizer: the same teacher through the cross-tokenizer path (re-rendered, re-tokenized, aligned),
  which gives the same step bit for bit (tests/test_cross_tokenizer.py): the path's own overhead;
* cross, BPE: a teacher of the same shape whose tokenizer is the byte-level BPE of the testbed
  (`models.tokenizer.build_bpe_tokenizer` when present, else one trained here the same way).

Each is the median of `--reps` steps, interleaved. The cross path's time is split into its parts: re-reading the
rows (`teacher_view`: rendering, tokenizing, aligning; done twice a step, for the scores and the chunk ids), the
teacher's forward on its own tokens, and mapping the scores back (`to_student`). Writes
benchmarks/cross_tokenizer_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from mopd.core.batch import rollout_batch
from mopd.core.schema import MOPDStage
from mopd.envs import ALPHABET, get_domain
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.models.prompting import RAW
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.teachers.cross_tokenizer import CrossTokenizer, ForeignTeacher, PanelTeacher, teacher_view
from mopd.teachers.panel import TeacherPanel
from mopd.teachers.remote import MixedPanel

OUT = Path(__file__).resolve().parent / "cross_tokenizer_cost.json"
DEMO = TinyModelConfig(hidden_size=128, layers=2, heads=4, kv_heads=2, intermediate_size=384)
DOMAINS = ("reversal", "sorting", "shift")


def bpe_tokenizer():
    """The testbed's BPE (`build_bpe_tokenizer`), or a byte-level BPE of 256 tokens trained here on the domains."""
    try:
        from mopd.models.tokenizer import build_bpe_tokenizer  # type: ignore[attr-defined]

        return build_bpe_tokenizer(list(DOMAINS))
    except (ImportError, TypeError):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        rng = random.Random(0)
        corpus = [p.prompt + p.answer for d in DOMAINS for p in get_domain(d).sample_train(rng, 2000)]
        core = Tokenizer(models.BPE(unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        core.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=256 + 64, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                       eos_token="<eos>", unk_token="<unk>", padding_side="left")


def answer_batch(tok, n: int):
    """`n` rows of the demo's domains: raw prompts, the reference answers as completions, then EOS."""
    rng = random.Random(1)
    problems = [p for i in range(n) for p in get_domain(DOMAINS[i % 3]).sample_train(rng, 1)]
    prompts = [RAW.token_ids(tok, p.prompt) for p in problems]
    answers = [tok(p.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p in problems]
    P, N = max(map(len, prompts)), max(map(len, answers))
    ids_p, mask_p = torch.zeros(n, P, dtype=torch.long), torch.zeros(n, P, dtype=torch.long)
    ids_c, mask_c = torch.zeros(n, N, dtype=torch.long), torch.zeros(n, N)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        ids_p[i, P - len(p):], mask_p[i, P - len(p):] = torch.tensor(p), 1
        ids_c[i, : len(a)], mask_c[i, : len(a)] = torch.tensor(a), 1
    batch = rollout_batch(ids_p, mask_p, ids_c, torch.zeros(n, N), mask_c, prompts=[p.prompt for p in problems],
                          completions=[p.answer for p in problems], domains=[p.domain for p in problems],
                          references=[p.answer for p in problems])
    return batch.with_rewards(torch.ones(n))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    tok, bpe = build_char_tokenizer(ALPHABET), bpe_tokenizer()
    student = build_tiny_model(DEMO, len(tok), tok, 0)
    teacher = build_tiny_model(DEMO, len(tok), tok, 1).eval().requires_grad_(False)
    teacher_bpe = build_tiny_model(DEMO, len(bpe), bpe, 2).eval().requires_grad_(False)
    routes = {d: "t" for d in DOMAINS}
    panels = {
        "same": TeacherPanel(models={"t": teacher}, teacher_of_domain=routes),
        "cross, same tokenizer": MixedPanel(local=None, remote={"t": ForeignTeacher(PanelTeacher(
            TeacherPanel(models={"t": teacher}, teacher_of_domain=routes), "t"), CrossTokenizer(tok, tok, RAW))},
            teacher_of_domain=routes),
        "cross, BPE": MixedPanel(local=None, remote={"t": ForeignTeacher(PanelTeacher(
            TeacherPanel(models={"t": teacher_bpe}, teacher_of_domain=routes), "t"), CrossTokenizer(tok, bpe, RAW))},
            teacher_of_domain=routes),
    }
    settings = MOPDStage(kind="mopd", init="x", steps=1, teachers=routes, max_new_tokens=10)
    batch = answer_batch(tok, args.batch)

    def step(panel) -> None:
        student.zero_grad()
        loss, _ = policy_loss(student, batch, PolicyConfig(sampling=settings, distill=settings, teachers=panel),
                              temperature=1.0)
        loss.backward()

    times: dict[str, list[float]] = {k: [] for k in panels}
    parts: dict[str, list[float]] = {"re-read rows (teacher_view)": [], "teacher forward": [],
                                     "scores to student (to_student)": []}
    cross = panels["cross, BPE"].remote["t"]
    with torch.no_grad():
        view = teacher_view(cross.cross, batch)
    for _ in range(args.reps):
        for name, panel in panels.items():
            times[name].append(timed(lambda p=panel: step(p)))
        with torch.no_grad():
            parts["re-read rows (teacher_view)"].append(timed(lambda: teacher_view(cross.cross, batch)))
            parts["teacher forward"].append(timed(lambda: cross.inner.sampled(view.batch)()))
            lp = cross.inner.sampled(view.batch)()
            parts["scores to student (to_student)"].append(timed(lambda lp=lp: view.to_student(lp)))
    same = statistics.median(times["same"])
    chunk_lengths = [sum(1 for c in p.student_chunk.values()) / max(1, p.chunks) for p in view.plans]
    result = {
        "command": f"benchmarks/cross_tokenizer_cost.py --batch {args.batch} --reps {args.reps}",
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "step_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio_to_same": {k: statistics.median(v) / same for k, v in times.items()},
        "cross_bpe_parts_s": {k: statistics.median(v) for k, v in parts.items()},
        "bpe_vocab": len(bpe),
        "student_tokens_per_chunk_mean": statistics.fmean(chunk_lengths),
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
