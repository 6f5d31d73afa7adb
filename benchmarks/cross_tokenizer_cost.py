"""The cost of a MOPD step with a teacher of another tokenizer, against the same step with a teacher of the
student's own, for the sampled-token objective and two distribution-level ones (docs/CROSS_TOKENIZER.md, "Cost").

Three panels score one batch of the character student's rollouts: the teacher in process (`same`), the same
teacher through the cross-tokenizer path (`same-via-cross`: what the path itself costs), and a teacher with a
byte-level BPE trained on the domains' text (`bpe`). Each step is `policy_loss` + backward, timed `--repeats`
times with the panels interleaved (medians reported), and split into where the time goes: re-reading rows in the
teacher's tokens (`teacher_view`: rendering, tokenizing, aligning), the teacher's decoder passes, and the rest
(the student's forward and backward, both heads, the loss, moving the teacher's answers into the student's
vocabulary). Each part's median is taken on its own, so the parts need not add up to the step's median.

    .venv/bin/python benchmarks/cross_tokenizer_cost.py [--threads 1] [--repeats 7] [--rows 16]

Writes benchmarks/cross_tokenizer_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import mopd.teachers.cross_tokenizer as cross_tokenizer
import mopd.teachers.panel as teacher_panel
from mopd.core.schema import MOPDStage
from mopd.envs import ALPHABET, get_domain
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.learner.rollout import rollout
from mopd.models.prompting import RAW
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.teachers.cross_tokenizer import CrossTokenizer, ForeignTeacher, PanelTeacher
from mopd.teachers.panel import TeacherPanel
from mopd.teachers.remote import MixedPanel

DOMAINS = ("addition", "reversal")
OUT = Path(__file__).resolve().parent / "cross_tokenizer_cost.json"


def bpe_tokenizer(corpus: list[str], size: int) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|end|>", pad_token="<|end|>",
                                   padding_side="left", clean_up_tokenization_spaces=False)


class Clock:
    """Seconds spent in wrapped functions, by label (the outermost call only)."""

    def __init__(self):
        self.spent: dict[str, float] = defaultdict(float)
        self.depth = 0

    def wrap(self, label: str, fn):
        def timed(*args, **kwargs):
            self.depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.spent[label] += time.perf_counter() - start
        return timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--objectives", nargs="+", default=["sampled", "full_reverse_kl", "topk"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = build_char_tokenizer(ALPHABET)
    domains = {n: get_domain(n) for n in DOMAINS}
    rng = random.Random(0)
    corpus = [f"{p.prompt} {p.answer}" for d in domains.values() for p in d.sample_train(rng, 400)]
    bpe = bpe_tokenizer(corpus, 400)
    config = TinyModelConfig(hidden_size=args.hidden, layers=2, heads=4, kv_heads=2, intermediate_size=2 * args.hidden)
    student = build_tiny_model(config, len(tok), tok, 0)
    same = build_tiny_model(config, len(tok), tok, 1).eval().requires_grad_(False)
    other = build_tiny_model(config, len(bpe), bpe, 2).eval().requires_grad_(False)
    routes = {d: "t" for d in DOMAINS}
    clock = Clock()
    cross_tokenizer.teacher_view = clock.wrap("teacher_view", cross_tokenizer.teacher_view)
    teacher_panel.final_hidden = clock.wrap("teacher_decoder", teacher_panel.final_hidden)

    def panel(teacher, reader):
        own = TeacherPanel(models={"t": teacher}, teacher_of_domain=routes)
        return own if reader is None else MixedPanel(local=None, teacher_of_domain=routes,
                                                     remote={"t": ForeignTeacher(PanelTeacher(own, "t"), reader)})

    readers = {"same-via-cross": CrossTokenizer(tok, tok, RAW), "bpe": CrossTokenizer(tok, bpe, RAW)}
    for reader in readers.values():
        _ = reader.vocab  # the shared vocabulary is built once per pair, before the first step
    # a fresh panel per step: a teacher of another tokenizer keeps its last batch's reading, and each step of a
    # run has a new batch
    panels = {"same": lambda: panel(same, None), "same-via-cross": lambda: panel(same, readers["same-via-cross"]),
              "bpe": lambda: panel(other, readers["bpe"])}
    problems = [p for d in domains.values() for p in d.sample_train(rng, args.rows // len(DOMAINS))]
    results = {}
    for objective in args.objectives:
        settings = MOPDStage(kind="mopd", init="x", steps=1, teachers=dict(routes), group_size=1,
                             max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, objective=objective, topk=16)
        batch, _ = rollout(student, tok, problems, domains, settings, temperature=1.0,
                           generator=torch.Generator().manual_seed(1))
        walls: dict[str, list[float]] = defaultdict(list)
        parts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for _ in range(args.repeats):
            for name, fresh in panels.items():
                p = fresh()
                clock.spent.clear()
                student.zero_grad()
                start = time.perf_counter()
                loss, _ = policy_loss(student, batch, PolicyConfig(sampling=settings, distill=settings, teachers=p),
                                      temperature=1.0)
                loss.backward()
                wall = time.perf_counter() - start
                walls[name].append(wall)
                for label in ("teacher_view", "teacher_decoder"):
                    parts[name][label].append(clock.spent.get(label, 0.0))
                parts[name]["rest"].append(wall - sum(clock.spent.values()))
        results[objective] = {
            name: {"step_ms": round(1e3 * statistics.median(w), 1),
                   **{f"{k}_ms": round(1e3 * statistics.median(v), 1) for k, v in parts[name].items()}}
            for name, w in walls.items()}
        results[objective]["tokens"] = int(batch.completion_mask_B_T.sum())
    out = {"command": "benchmarks/cross_tokenizer_cost.py " + " ".join(f"--{k.replace('_', '-')} {v}" if not
                                                                     isinstance(v, list) else f"--{k} {' '.join(v)}"
                                                                     for k, v in vars(args).items()),
           "machine": platform.processor() or platform.machine(), "threads": args.threads, "repeats": args.repeats,
           "rows": args.rows, "hidden": args.hidden, "bpe_vocab": len(bpe), "results": results}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
