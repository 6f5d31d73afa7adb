"""TRL's DistillationTrainer against mopd at the real workload's shape, and the scaling curves (issue 17, items 3-4).

    .venv/bin/python benchmarks/real_shape.py real [--runs 1] [--small-runs 5] [--cap-gib 8] [--threads 1]
    .venv/bin/python benchmarks/real_shape.py curves [--axes vocab completion teachers] [--cap-gib 8]

(TRL comes with the benchmark extra: `.venv/bin/pip install -e '.[bench]'`.)

The shape: Qwen3-architecture models built here from a seed (transformers `Qwen3Config`, random weights), Qwen3's
vocabulary size 151,936 with a word-level tokenizer of that many tokens ("t3" ... "t151935"), a student of hidden
64, 2 layers (9.9M parameters, nearly all its tied embedding) and a teacher of hidden 192, 2 layers (about 3x:
29.6M); 32 prompts of 16-64 tokens a step, completions of up to 256 tokens at temperature 1. Lengths vary as in
real rollouts: every model's EOS output row is a fixed random direction of norm `EOS_NORM` (scaled by
log V / log 151,936 at other vocabulary sizes), so EOS becomes likely at some positions and not others (each step's mean / min / max length is stored, for both tools).

- `trl`: `trl.DistillationTrainer`, beta = 1 (reverse KL over the full vocabulary, its own chunked loss),
  generation by `transformers.generate`; float32, no gradient checkpointing, logging/eval/saving off. Its
  generation is timed inside its step (`generation`).
- `mopd-full`: mopd's step (`sampling.sampler.sample`, then `learner.policy.policy_loss` against a one-teacher
  `TeacherPanel`, backward, grad clip 1.0, AdamW) with `objective: full_reverse_kl`, the same loss as TRL's, at
  `--chunk` (logit_chunk, 8) and `--micro-batch` (micro_batch_size, 4): the settings a real-vocabulary recipe
  uses to bound its memory. On a CPU a block's logits should stay under glibc's 32 MiB mmap threshold (4 x 8 x
  151,936 float32 = 19 MiB): a larger block is a fresh mapping each time, and its page faults cost more than its
  arithmetic (chunk 64, 148 MiB blocks: 1.58x slower per full-vocabulary step, 1.29x per sampled-token step).
  Phases timed: sampling, loss forward,
  backward + update.
- `mopd`: the same with mopd's default `objective: sampled`.
- `mopd-full-by-length`, `mopd-by-length`: the same with `micro_batch_by_length` (micro-batches of rows of
  similar length, each over its own columns: the decoders skip most padding).
- `mopd-full-unchunked` (curves only): `full_reverse_kl` with `logit_chunk: null`, one block of logits: what
  memory does when [B, T, V] logits are held.

Same optimizer on both sides (AdamW lr 3e-4, betas (0.9, 0.99), no weight decay), one torch thread each. Each run
of a tool is a fresh subprocess under an address-space cap (`--cap-gib`, RLIMIT_AS) so its peak RSS (ru_maxrss)
is its own and an out-of-memory ends only that run (recorded: its OOM is a result). A run is one untimed warm-up
step of 2 rows, then `--steps` timed steps (wall and process CPU time: on a shared machine the CPU time is the
steadier figure); runs alternate between tools in a rotating order; figures are medians over runs. `real` runs
the full shape `--runs` times and then `--small-runs` runs at `--small-batch` rows (the medians this machine can
afford); it writes results.json key "real_shape". `curves` (one run per point, reduced batches: see `CURVES`; the
completion-length axis without the EOS bias, so every row has the point's length) writes "real_shape/curves" and
docs/real_shape_scaling.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from real_shape_plot import plot

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
PLOT = HERE.parent / "docs" / "real_shape_scaling.png"
VOCAB = 151_936
EOS_NORM = 4.5
PAD, EOS, BOS = 0, 1, 2
LR = 3e-4
REAL = {"batch": 32, "completion": 256, "vocab": VOCAB, "teachers": 1}


def build(out: Path, vocab: int, n_teachers: int, student_hidden: int = 64, teacher_hidden: int = 192,
          eos_norm: float = EOS_NORM, layers: int = 2, teacher_layers: int | None = None) -> None:
    """Student, `n_teachers` teachers (seeds 1..n) and a word-level tokenizer of `vocab` tokens, saved under `out`;
    `eos_norm` 0: no EOS bias (EOS about as likely as any token: completions run to their maximum)."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    words = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, **{f"t{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", unk_token="<pad>")
    tok.save_pretrained(out / "tokenizer")
    eos_dir = torch.randn(max(student_hidden, teacher_hidden), generator=torch.Generator().manual_seed(99))

    def model(hidden: int, seed: int, name: str, layers: int) -> None:
        torch.manual_seed(seed)
        cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                          max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=PAD,
                          eos_token_id=EOS, bos_token_id=BOS)
        m = Qwen3ForCausalLM(cfg)
        with torch.no_grad():  # EOS as likely at every vocabulary size: its logit is measured against log V
            d = eos_dir[:hidden]
            m.get_output_embeddings().weight[EOS] = eos_norm * math.log(vocab) / math.log(VOCAB) * d / d.norm()
        m.generation_config.pad_token_id, m.generation_config.eos_token_id = PAD, EOS
        m.save_pretrained(out / name)

    model(student_hidden, 0, "student", layers)
    for i in range(n_teachers):
        model(teacher_hidden, 1 + i, f"teacher{i}", teacher_layers or layers)


def prompts(n: int, vocab: int, seed: int) -> list[str]:
    """`n` prompts of 16-64 random tokens (ids 3 .. vocab - 1), the same for every tool given the seed."""
    import random

    rng = random.Random(seed)
    return [" ".join(f"t{rng.randrange(3, vocab)}" for _ in range(rng.randint(16, 64))) for _ in range(n)]


def _worker_mopd(a: argparse.Namespace, objective: str, chunk: int | None, by_length: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from mopd.core.schema import MOPDStage
    from mopd.learner.objective_table import PolicyConfig
    from mopd.learner.policy import policy_loss
    from mopd.runtime import keep_freed_memory
    from mopd.sampling.sampler import sample
    from mopd.teachers.panel import TeacherPanel

    keep_freed_memory()
    tok = PreTrainedTokenizerFast.from_pretrained(a.models / "tokenizer")
    student = AutoModelForCausalLM.from_pretrained(a.models / "student", dtype="float32")
    names = [f"teacher{i}" for i in range(a.teachers)]
    teachers = {n: AutoModelForCausalLM.from_pretrained(a.models / n, dtype="float32").eval().requires_grad_(False)
                for n in names}
    domains = [f"d{i}" for i in range(a.teachers)]
    panel = TeacherPanel(models=teachers, teacher_of_domain=dict(zip(domains, names, strict=True)), logit_chunk=chunk)
    settings = MOPDStage(kind="mopd", init="student", steps=1, teachers=dict(zip(domains, names, strict=True)),
                         group_size=1, max_new_tokens=a.completion, temperature=1.0, top_p=1.0, alpha=0.0,
                         objective=objective, logit_chunk=chunk, micro_batch_size=a.micro_batch,
                         micro_batch_by_length=by_length)
    cfg = PolicyConfig(sampling=settings, distill=settings, teachers=panel)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.99))
    student.train()

    def step(texts: list[str], seed: int) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        batch = sample(student, tok, texts, max_new_tokens=a.completion, temperature=1.0,
                       generator=torch.Generator().manual_seed(seed),
                       domains=[domains[i % len(domains)] for i in range(len(texts))])
        batch = batch.with_rewards(torch.zeros(len(texts)))
        t1 = time.perf_counter()
        loss, _ = policy_loss(student, batch, cfg, temperature=1.0, logit_chunk=chunk,
                              micro_batch_size=a.micro_batch, by_length=by_length)
        t2 = time.perf_counter()
        if loss.requires_grad:  # with several micro-batches each one's backward ran inside policy_loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        lengths = batch.completion_mask_B_T.sum(-1)
        tokens = decoder_tokens(batch.attention_mask_B_T, a.micro_batch)
        return {**tokens, "seconds": t3 - t0, "cpu_seconds": time.process_time() - c0, "sampling": t1 - t0, "loss_forward": t2 - t1, "backward_and_update": t3 - t2,
                "length_mean": float(lengths.mean()), "length_min": int(lengths.min()), "length_max": int(lengths.max())}

    step(prompts(2, a.vocab, seed=10_000 + a.run), 10_000 + a.run)  # warm-up
    return {"steps": [step(prompts(a.batch, a.vocab, seed=a.run * 100 + i), a.run * 100 + i)
                      for i in range(a.steps)]}


def decoder_tokens(mask_B_T, micro: int) -> dict:
    """Rows x columns the student's decoder runs over in a step's micro-batches of `micro` rows, in batch order
    over every column and by length over their own columns, against the real tokens: what padding costs."""
    import torch

    def width(m) -> int:
        cols = m.any(0).nonzero().flatten()
        return int(cols[-1] - cols[0] + 1) if cols.numel() else 0

    order = torch.argsort(mask_B_T.sum(1), descending=True, stable=True)
    B, T = mask_B_T.shape
    return {"decoder_tokens_padded": B * T,
            "decoder_tokens_by_length": sum(len(order[i:i + micro]) * width(mask_B_T[order[i:i + micro]])
                                            for i in range(0, B, micro)),
            "real_tokens": int(mask_B_T.sum())}


def _worker_trl(a: argparse.Namespace) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(a.models / "tokenizer")
    student = AutoModelForCausalLM.from_pretrained(a.models / "student", dtype="float32")
    teacher = AutoModelForCausalLM.from_pretrained(a.models / "teacher0", dtype="float32")
    texts = prompts(2, a.vocab, seed=10_000 + a.run) + [
        p for i in range(a.steps) for p in prompts(a.batch, a.vocab, seed=a.run * 100 + i)]
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        generating = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.c0, StepTimer.generating = time.perf_counter(), time.process_time(), 0.0

        def on_step_end(self, args, state, control, **kwargs):
            seen = self.trainer._metrics["train"]
            steps.append({"seconds": time.perf_counter() - self.t0, "cpu_seconds": time.process_time() - self.c0,
                          "generation": StepTimer.generating, **{
                f"length_{k}": seen[f"completions/{k}_length"][-1] for k in ("mean", "min", "max")}})

    def train(rows: list[str], n_steps: int, out: str) -> None:
        per_step = len(rows) // n_steps
        micro = max(1, per_step // 4) if getattr(a, "lean", False) else per_step  # `trl-lean`: 4 micro-batches
        cfg = DistillationConfig(
            output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=per_step // micro,
            max_steps=n_steps, max_completion_length=a.completion, temperature=1.0, top_p=1.0, top_k=0, beta=1.0,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
            adam_beta2=0.99, max_grad_norm=1.0, bf16=False, fp16=False,
            gradient_checkpointing=getattr(a, "lean", False), use_cpu=True,
            shuffle_dataset=False, dataloader_num_workers=0, logging_strategy="no", save_strategy="no",
            eval_strategy="no", report_to="none", disable_tqdm=True, seed=a.run,
        )
        timer = StepTimer()
        timer.trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=cfg, processing_class=tok, callbacks=[timer],
            train_dataset=Dataset.from_dict({"prompt": [f"<bos> {p}" for p in rows]}))
        generate = timer.trainer._generate

        def timed_generate(*args, **kwargs):  # TRL's generation, timed inside its step
            t0 = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                StepTimer.generating += time.perf_counter() - t0

        timer.trainer._generate = timed_generate
        timer.trainer.train()

    with tempfile.TemporaryDirectory() as out:
        train(texts[:2], 1, out)  # warm-up, in its own trainer
        steps.clear()
        train(texts[2:], a.steps, out)
    return {"steps": steps}


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.run)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if a.worker == "trl":
        res = _worker_trl(a)
    else:
        tool = a.worker.removesuffix("-by-length")
        objective = "sampled" if tool == "mopd" else "full_reverse_kl"
        res = _worker_mopd(a, objective, None if tool == "mopd-full-unchunked" else a.chunk,
                           by_length=a.worker.endswith("-by-length"))
    secs = [s["seconds"] for s in res["steps"]]
    cpu = [s["cpu_seconds"] for s in res["steps"]]
    print(json.dumps({**res, "completions_per_s": a.batch * len(secs) / sum(secs), "step_s": statistics.median(secs),
                      "completions_per_cpu_s": a.batch * len(cpu) / sum(cpu),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "rss_before_mib": round(before, 1)}))


def run_worker(tool: str, models: Path, shape: dict, run: int, a: argparse.Namespace) -> dict:
    """One run of `tool` in a fresh process under the address-space cap; an error (an OOM) is a recorded result."""
    cmd = [sys.executable, __file__, "worker", "--worker", tool, "--models", str(models), "--run", str(run),
           "--steps", str(a.steps), "--threads", str(a.threads), "--chunk", str(a.chunk),
           "--micro-batch", str(a.micro_batch),
           *[x for k, v in shape.items() for x in (f"--{k}", str(v))]]
    return run_capped(tool, cmd, a.cap_gib, a.threads)


def run_capped(tool: str, cmd: list[str], cap_gib: float, threads: int) -> dict:
    """Run a worker command in a fresh process under an address-space cap (RLIMIT_AS), so its peak RSS is its own
    and an out-of-memory ends only that run: its last stdout line as JSON, or the failure as a recorded result."""
    cap = int(cap_gib * 2**30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=limit)
    wall = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
        oom = "memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
        return {"tool": tool, "failed": tail[0][-300:], "oom": oom, "wall_s": wall}
    return {"tool": tool, **json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def median_of(runs: list[dict], key: str) -> float | None:
    ok = [r[key] for r in runs if "failed" not in r]
    return round(statistics.median(ok), 3) if ok else None


def compare(tools: list[str], shape: dict, runs: int, a: argparse.Namespace, tmp: Path,
            eos_norm: float = EOS_NORM) -> dict:
    """`runs` rounds of every tool at `shape` (rotating order), medians and the mopd/TRL ratios."""
    models = tmp / f"v{shape['vocab']}_t{shape['teachers']}_e{eos_norm}_h{a.student_hidden}_{a.teacher_hidden}"
    if not models.exists():
        build(models, shape["vocab"], shape["teachers"], a.student_hidden, a.teacher_hidden, eos_norm=eos_norm,
              layers=a.layers)
    by_tool: dict[str, list[dict]] = {t: [] for t in tools}
    for r in range(runs):
        for tool in tools[r % len(tools):] + tools[: r % len(tools)]:
            res = run_worker(tool, models, shape, r, a)
            by_tool[tool].append(res)
            what = res.get("failed") or (f"{res['completions_per_s']:.2f} completions/s, step {res['step_s']:.1f} s, "
                                         f"peak RSS {res['peak_rss_mib']:.0f} MiB")
            print(f"{shape} run {r} {tool}: {what}", flush=True)
    med = {t: {"completions_per_s": median_of(rs, "completions_per_s"), "step_s": median_of(rs, "step_s"),
               "completions_per_cpu_s": median_of(rs, "completions_per_cpu_s"),
               "peak_rss_mib": median_of(rs, "peak_rss_mib"), "failed_runs": sum("failed" in x for x in rs)}
           for t, rs in by_tool.items()}
    trl = med.get("trl", {})
    for t, m in med.items():
        if t != "trl" and trl.get("completions_per_s") and m["completions_per_s"]:
            m["speed_vs_trl"] = round(m["completions_per_s"] / trl["completions_per_s"], 2)
            m["cpu_speed_vs_trl"] = round(m["completions_per_cpu_s"] / trl["completions_per_cpu_s"], 2)
            m["memory_vs_trl"] = round(m["peak_rss_mib"] / trl["peak_rss_mib"], 3)
    return {"shape": shape, "median": med, "runs": by_tool}


def save_result(result: dict, key: str, out: Path | None) -> None:
    """`result` to `out` (`--out`), or under `key` in benchmarks/results.json."""
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    else:
        update_results(key, result)


def update_results(key: str, value: dict) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


CURVES = {  # axis -> (values, the shape's other settings, tools): reduced batches, one run per point
    "vocab": ([1024, 8192, 32768, VOCAB], {"batch": 4, "completion": 128, "teachers": 1},
              ["trl", "mopd-full", "mopd"]),
    "completion": ([32, 128, 512, 1024], {"batch": 2, "vocab": VOCAB, "teachers": 1},
                   ["trl", "mopd-full", "mopd-full-unchunked"]),
    "teachers": ([1, 2, 4, 8], {"batch": 8, "completion": 64, "vocab": 32768}, ["mopd-full", "mopd"]),
}


def curves(a: argparse.Namespace, tmp: Path, axes: list[str], scale: float = 1.0) -> dict:
    out = {}
    for axis in axes:
        values, fixed, tools = CURVES[axis]
        points = []
        for v in values:
            shape = {**fixed, axis: v}
            if scale != 1.0:  # the test's miniature: small vocabularies and lengths
                shape = {k: max(1, int(x * scale)) if k in ("vocab", "completion") else x for k, x in shape.items()}
                shape["vocab"] = max(shape["vocab"], 64)
            # the completion axis without an EOS bias, so that every row is as long as the point says
            points.append(compare(tools, shape, 1, a, tmp, eos_norm=0.0 if axis == "completion" else EOS_NORM))
        out[axis] = points
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["real", "curves", "worker"])
    ap.add_argument("--runs", type=int, default=1, help="runs per tool at the shape")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cap-gib", type=float, default=8.0, help="address-space cap of each run (RLIMIT_AS)")
    ap.add_argument("--chunk", type=int, default=8, help="mopd's logit_chunk")
    ap.add_argument("--micro-batch", type=int, default=4, help="mopd's micro_batch_size")
    ap.add_argument("--small-batch", type=int, default=4, help="`real`: the batch of the `--small-runs` medians")
    ap.add_argument("--small-runs", type=int, default=5, help="`real`: runs at `--small-batch` (0: none)")
    ap.add_argument("--axes", nargs="+", default=list(CURVES), choices=list(CURVES))
    ap.add_argument("--tools", nargs="+", default=["trl", "mopd-full", "mopd"], help="`real`: the tools compared")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink vocabulary and lengths (tests)")
    ap.add_argument("--student-hidden", type=int, default=64, help="the student's width (the teacher's: 3x it)")
    ap.add_argument("--teacher-hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of student and teachers")
    ap.add_argument("--out", type=Path, default=None, help="write the results here instead of results.json")
    for k, v in REAL.items():
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode == "worker":
        return worker(a)
    sys.path.insert(0, str(HERE))
    import _common

    head = {"command": "python benchmarks/real_shape.py " + " ".join(sys.argv[1:]), "machine": _common.machine(),
            "threads": a.threads, "cap_gib": a.cap_gib, "logit_chunk": a.chunk, "micro_batch_size": a.micro_batch,
            "timed_steps_per_run": a.steps, "student_hidden": a.student_hidden, "teacher_hidden": a.teacher_hidden,
            "layers": a.layers}
    with tempfile.TemporaryDirectory() as tmp:
        if a.mode == "real":
            shape = {k: getattr(a, k) for k in REAL}
            result = {**head, "real": compare(a.tools, shape, a.runs, a, Path(tmp))}
            if a.small_runs:  # the medians of several runs, at a batch this shared machine can afford that often
                result["small"] = compare(a.tools, {**shape, "batch": a.small_batch},
                                          a.small_runs, a, Path(tmp))
            key = "real_shape"
        else:
            result = {**head, "curves": curves(a, Path(tmp), a.axes, a.scale)}
            plot(result["curves"], a.out.with_suffix(".png") if a.out else PLOT)
            key = "real_shape/curves"
    summary = {k: v["median"] for k, v in result.items() if isinstance(v, dict) and "median" in v}
    print(json.dumps(summary or {k: [p["median"] for p in v] for k, v in result["curves"].items()}, indent=1))
    save_result(result, key, a.out)


if __name__ == "__main__":
    main()
