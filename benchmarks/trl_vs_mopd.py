"""Single-teacher on-policy reverse-KL distillation: TRL's DistillationTrainer against mopd, same machine.

    .venv/bin/python benchmarks/trl_vs_mopd.py [--runs 5] [--steps 5] [--warmup 2] [--threads 1]

(needs the benchmark extra: `.venv/bin/pip install -e '.[bench]'`.)

Both tools train the same tiny Qwen3 student (0.79M parameters) against the same teacher (2.77M), built here
from a seed with the character tokenizer, on the same prompts (64 per step, `[BOS] prompt`), sampling 8
completion tokens at temperature 1 and taking an AdamW step (lr 3e-4, betas (0.9, 0.99), no weight decay,
grad-norm clip 1.0) in float32 on the CPU with the same number of torch threads.

- `trl`: `trl.DistillationTrainer` with beta = 1 (reverse KL over the full vocabulary on the student's own
  samples), generation by `transformers.generate`; gradient checkpointing, bf16, logging, eval and saving off.
- `mopd-full`: mopd's `objective: full_reverse_kl` — the same loss as TRL's beta = 1.
- `mopd`: mopd's default `objective: sampled` (the per-token reverse-KL advantage of MOPD, one teacher).
- `trl-bf16` / `mopd-full-bf16`: the same two with bfloat16 mixed precision, float32 master weights on both
  sides (TRL `bf16=True`, which autocasts; mopd `dtype: bfloat16`, which autocasts the student, holds the
  frozen teacher in bfloat16 and trains with eager attention on CPU, as a mopd stage does). Optional
  (`--tools`): bfloat16 pays off only on CPUs with AMX / AVX512-BF16.
- `trl-bf16-eager`: `trl-bf16` with both models loaded with `attn_implementation="eager"`, the choice mopd makes
  for itself, so that what it buys is not credited to mopd alone.
- `trl-default`: TRL's own defaults for these two switches (`bf16=True`, `gradient_checkpointing=True`).
- `trl-malloc`: `trl` in a process given the allocator setting the `mopd` command applies to itself
  (`mopd.runtime.keep_freed_memory`; mopd's runs always have it), so that what the setting buys is not
  credited to mopd alone.

Each run of a tool is a fresh subprocess (so each has its own peak RSS): `--warmup` untimed steps, then
`--steps` timed ones; a run's completions/s is 64 x steps / their wall time. Runs alternate between the tools
(the order rotates each round) so load from other processes hits all of them alike; the figures are medians
over runs. Writes `benchmarks/results.json` (key "trl_vs_mopd", or "trl_vs_mopd/threads=N" for N != 1).
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
RESULTS = HERE / "results.json"
BATCH = 64
COMPLETION_TOKENS = 8
TOOLS = ("trl", "mopd-full", "mopd")
EXTRA_TOOLS = ("trl-bf16", "mopd-full-bf16", "trl-bf16-eager", "trl-default", "trl-malloc")


def _worker_trl(models: Path, run: int, warmup: int, steps: int, bf16: bool = False,
                checkpointing: bool = False, attention: str = "sdpa") -> list[float]:
    """Train with TRL's DistillationTrainer; a callback times each optimizer step (generation included)."""
    import _common
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(models / "tokenizer")
    student = AutoModelForCausalLM.from_pretrained(models / "student", dtype="float32", attn_implementation=attention)
    teacher = AutoModelForCausalLM.from_pretrained(models / "teacher0", dtype="float32", attn_implementation=attention)
    prompts = [f"{tok.bos_token}{p.prompt}" for p in _common.problems(BATCH * (warmup + steps), seed=run)]
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        cfg = DistillationConfig(
            output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
            max_steps=warmup + steps, max_completion_length=COMPLETION_TOKENS, temperature=1.0, top_p=1.0,
            top_k=0, beta=1.0, learning_rate=_common.LR, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0, bf16=bf16, fp16=False,
            gradient_checkpointing=checkpointing, use_cpu=True, shuffle_dataset=False, dataloader_num_workers=0,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
            disable_tqdm=True, seed=run,
        )
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg,
                                      train_dataset=Dataset.from_dict({"prompt": prompts}),
                                      processing_class=tok, callbacks=[StepTimer()])
        trainer.train()
    return times[warmup:]


def _worker_mopd(models: Path, run: int, warmup: int, steps: int, objective: str, bf16: bool = False) -> list[float]:
    """Train with mopd's real step (rollout, policy_loss with a one-teacher panel, backward, clip, AdamW); with
    `bf16`, in mopd's mixed precision: float32 student weights stepped under autocast, the frozen teacher in
    bfloat16."""
    import _common
    import torch

    from mopd.models.checkpoint import load_model
    from mopd.models.precision import compute_precision, training_attention
    from mopd.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(_common.ALPHABET)
    compute = torch.bfloat16 if bf16 else torch.float32
    student, teacher = load_model(models / "student"), load_model(models / "teacher0", dtype=compute)
    training_attention(student, torch.device("cpu"), compute)  # what a mopd stage does with `dtype: bfloat16`
    step = _common.mopd_step_fn(student, {"teacher0": teacher}, tok,
                                _common.mopd_settings(COMPLETION_TOKENS, objective),
                                {d: "teacher0" for d in _common.DOMAINS})
    batch = _common.problems(BATCH * (warmup + steps), seed=run)

    def one(i: int) -> None:
        with compute_precision(torch.device("cpu"), compute, torch.float32):
            step(batch[i * BATCH : (i + 1) * BATCH], run * 1000 + i)

    times = [_common.timed(lambda i=i: one(i)) for i in range(warmup + steps)]
    return times[warmup:]


def worker(args: argparse.Namespace) -> None:
    import _common
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.run)
    if args.worker.startswith("trl"):
        if args.worker == "trl-malloc":
            from mopd.runtime import keep_freed_memory

            keep_freed_memory()
        times = _worker_trl(args.models, args.run, args.warmup, args.steps,
                            bf16=args.worker not in ("trl", "trl-malloc"),
                            checkpointing=args.worker == "trl-default",
                            attention="eager" if args.worker.endswith("-eager") else "sdpa")
    else:
        objective = "full_reverse_kl" if args.worker.startswith("mopd-full") else "sampled"
        times = _worker_mopd(args.models, args.run, args.warmup, args.steps, objective,
                             bf16=args.worker.endswith("-bf16"))
    print(json.dumps({
        "tool": args.worker, "run": args.run, "step_seconds": [round(t, 4) for t in times],
        "completions_per_s": BATCH * len(times) / sum(times),
        "peak_rss_mib": round(_common.peak_rss_mib(), 1), "threads": torch.get_num_threads(),
    }))


def run_worker(tool: str, models: Path, run: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, "--models", str(models), "--run", str(run),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(HERE), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{tool} run {run} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def update_results(key: str, value: dict) -> None:
    """Merge one benchmark's figures into benchmarks/results.json (the other scripts own the other keys)."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same for every tool")
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS + EXTRA_TOOLS)
    ap.add_argument("--key", help="results.json key (default: trl_vs_mopd, or trl_vs_mopd/threads=N)")
    ap.add_argument("--worker", choices=TOOLS + EXTRA_TOOLS, help=argparse.SUPPRESS)
    ap.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import _common

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        _common.build_models(models, n_teachers=1)
        runs: dict[str, list[dict]] = {t: [] for t in args.tools}
        for r in range(args.runs):
            order = args.tools[r % len(args.tools):] + args.tools[: r % len(args.tools)]
            for tool in order:
                res = run_worker(tool, models, r, args)
                runs[tool].append(res)
                print(f"run {r} {tool:9s} {res['completions_per_s']:8.1f} completions/s  "
                      f"peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)

    summary = {t: {"completions_per_s": round(_common.median([x["completions_per_s"] for x in rs]), 1),
                   "peak_rss_mib": round(_common.median([x["peak_rss_mib"] for x in rs]), 1)}
               for t, rs in runs.items()}
    for ref in ("trl", "trl-bf16", "trl-default"):
        if ref in summary:
            base = summary[ref]["completions_per_s"]
            for t in summary:
                summary[t][f"speedup_vs_{ref}"] = round(summary[t]["completions_per_s"] / base, 2)
    import torch

    result = {
        "command": "python benchmarks/trl_vs_mopd.py " + " ".join(sys.argv[1:]),
        "machine": _common.machine(),
        "versions": {"torch": torch.__version__, "trl": _version("trl"), "mopd": _version("mopd")},
        "settings": {"batch": BATCH, "completion_tokens": COMPLETION_TOKENS, "runs": args.runs,
                     "timed_steps_per_run": args.steps, "warmup_steps_per_run": args.warmup,
                     "threads": args.threads,
                     "dtype": "bfloat16 mixed precision for *-bf16 and trl-default, else float32"},
        "median": summary,
        "runs": runs,
    }
    print(json.dumps(result["median"], indent=2))
    key = args.key or ("trl_vs_mopd" if args.threads == 1 else f"trl_vs_mopd/threads={args.threads}")
    update_results(key, result)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
