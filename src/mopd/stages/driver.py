"""The training loop every trainable stage shares: resume, optimizer, schedule, logging, eval, checkpoints.

A stage plugs in only `loss_fn(model, step) -> (loss, metrics)`. Everything random in a step is derived from
(seed, step), except what draws from torch's global generator (LoRA dropout), whose state a resumable checkpoint
saves and a resumed stage restores; so a stage resumed from its last checkpoint continues exactly as an
uninterrupted one would.
A step's metrics may count what it sampled (`samples/student`: rollouts of the model being trained;
`samples/teacher`: teacher traces); every metrics.jsonl record carries the running totals `samples` and
`teacher_samples`, so curves can be drawn against samples as well as steps.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.errors import StageError
from ..core.run_dir import CHECKPOINTS, FINAL, METRICS
from ..eval.evaluate import evaluate
from ..models.checkpoint import load_trainer_state, save_checkpoint
from .guards import DivergenceWatch, nonfinite_message
from .lineage import final_lineage, lineage, snapshot_path
from .loading import trainable_model, trainable_parameters
from .resolved import ResolvedStage
from .resumable import (
    checkpointed_seconds,
    prune_resumable,
    resume_point,
)
from .samples import EvalTranscripts, TeacherKL

# a stage's step: (model, 0-based step) -> (loss, metrics); the one thing a stage kind plugs into `train`
LossFn = Callable[[torch.nn.Module, int], tuple[torch.Tensor, dict[str, float]]]


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    return base


def rng_state() -> dict[str, Any]:
    """torch's global generator states (CPU and each CUDA device), saved with a resumable checkpoint.

    Why: problems and sampling use generators derived from (seed, step), but some randomness draws from the
    global generator (LoRA dropout masks). Without its state, a resumed stage would draw different masks from
    the uninterrupted run at every step after the checkpoint.
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def restore_rng_state(state: dict[str, Any] | None) -> None:
    """Put back what `rng_state` saved; a checkpoint from before it was saved (None) leaves the seeding as is."""
    if not state:
        return
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """metrics.jsonl of a stage; on resume, lines past the resumed step are dropped (they will be redone)."""

    def __init__(self, path: Path, resume_step: int, on_record: Callable[[dict], None] | None = None):
        self.path = path
        self.on_record = on_record  # each record also goes here (the run's experiment trackers)
        kept: list[str] = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
        path.write_text("".join(x + "\n" for x in kept))
        self.f = path.open("a")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, sort_keys=True) + "\n")
        self.f.flush()
        if self.on_record:
            self.on_record(record)

    def close(self) -> None:
        self.f.close()


class _NoLog:
    """The metrics log of a data-parallel learner's rank other than 0 (rank 0 writes the stage's)."""

    def write(self, record: dict) -> None:
        return None

    def close(self) -> None:
        return None


NO_LOG = _NoLog()


def eval_metrics(ctx: ResolvedStage, model, tokenizer=None, prompt_format=None, *, step: int = 0,
                 kl: TeacherKL | None = None, sink: EvalTranscripts | None = None) -> dict[str, dict[str, float]]:
    """Held-out scores on every recipe domain; `tokenizer` and `prompt_format` default to the stage's (an eval
    stage passes each scored model's own). Its transcripts go to `samples/eval-<step>.jsonl` (with each turn's
    teacher KL when `kl` is given), or into `sink` for a caller that writes several evals as one file."""
    tokenizer = tokenizer or ctx.tokenizer
    collect = sink if sink is not None else EvalTranscripts(ctx, model, tokenizer, step, kl)
    scores = evaluate(model, tokenizer, ctx.eval_domains, ctx.eval, prompt_format or ctx.prompt_format,
                      on_batch=collect)
    if sink is None:
        collect.write()
    return scores


def train(ctx: ResolvedStage, model_factory: Callable[[torch.dtype], torch.nn.Module],
          loss_fn: LossFn, evaluate_fn: Callable[[torch.nn.Module], dict[str, dict[str, float]]] | None = None,
          kl: TeacherKL | None = None) -> Path:
    """Run (or resume) the stage's steps and write its final checkpoint; returns the final checkpoint path.

    Forward passes (rollouts, loss, evals) run in `training_precision`: autocast to the stage's `dtype` when the
    trained weights are kept in float32; backward and the optimizer step run outside it, on the wide weights.
    The stage's learner strategy (`ctx.learner`: one process, or this rank of a DDP / FSDP group) lays the model
    out, finishes the step's backward (one rule: `learner.strategy`), sums and clips the gradients, keeps the
    model rank 0 samples, evaluates and saves, and gathers the optimizer state a checkpoint keeps; rank 0 alone
    picks the checkpoint to resume from, logs and saves. The update follows whenever the step left gradients.
    `evaluate_fn(model)` replaces the held-out generation eval for a model that does not generate (a reward
    model: its held-out pair accuracy); it returns {name: {"score": ..., ...}} like `eval_metrics`. `kl`: the
    per-turn teacher KL of the evals' transcripts (a MOPD stage's, `stages.samples.teacher_kl`).
    """
    s, learner = ctx.settings, ctx.learner
    torch.manual_seed(ctx.seed)
    resume_from = learner.from_lead(lambda: resume_point(ctx.stage_dir, ctx.name, ctx.hooks.warn))
    model = trainable_model(ctx, model_factory, resume_from)  # on the stage's device/dtype; LoRA-wrapped if asked
    whole = learner.shard(model, ctx.name)  # the model sampled, evaluated and saved (rank 0's)
    model.train()
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.99))
    start = 0
    totals = {"samples": 0, "teacher_samples": 0}  # running sample counts (see module docstring)
    skipped = 0  # steps whose update was skipped for a non-finite loss or gradient (`nonfinite: skip`)
    if resume_from:
        try:
            state = load_trainer_state(resume_from)
        except Exception as e:  # e.g. a file that would need unpickling code: refused, never executed
            raise StageError(
                f"stage {ctx.name!r}: the resumable checkpoint {resume_from} cannot be read safely "
                f"({e.__class__.__name__}); move it aside to start the stage over"
            ) from None
        learner.load_optimizer_state(opt, state["optimizer"], params)  # saved unsharded
        start = int(state["step"])
        totals.update(state.get("totals", {}))
        restore_rng_state(state.get("rng"))  # after the model is built: building it draws from the generator
        skipped = int(state.get("skipped", 0))
    watch = DivergenceWatch(ctx.name, ctx.hooks.warn)
    log = MetricsLog(ctx.stage_dir / METRICS, start, ctx.hooks.record) if learner.lead else NO_LOG
    precision = ctx.placement.precision
    t0 = time.time() - checkpointed_seconds(resume_from)  # a resumed stage's clock goes on (0 if new)
    try:
        for step in range(start, s.steps):
            lr = lr_at(step, s.steps, s.lr, s.warmup_steps, s.schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            with precision():
                loss, metrics = loss_fn(model, step)  # micro-batched: backward already done, loss detached
            done = step + 1
            t_update = time.perf_counter()
            norm, bad = learner.update(loss, opt, params, s.grad_clip)  # no update from a non-finite loss or norm
            metrics["time/update_s"] = time.perf_counter() - t_update
            if norm is not None and s.grad_clip:
                metrics["grad_norm"] = norm
            if bad is not None:
                what = nonfinite_message(ctx.name, done, *bad)
                if s.nonfinite == "stop":
                    raise StageError(f"{what}; stopped before the update, nothing non-finite was saved (lower `lr`, "
                                     "or set `nonfinite: skip` to skip such steps)")
                skipped += 1
                metrics["nonfinite/skipped"] = skipped
                ctx.hooks.warn(f"{what}: update skipped ({skipped} so far)")
            watch.observe(done, metrics)
            totals["samples"] += int(metrics.get("samples/student", 0))
            totals["teacher_samples"] += int(metrics.get("samples/teacher", 0))
            record = {"step": done, "lr": lr, "time": round(time.time() - t0, 3), **metrics, **totals}
            if learner.lead and s.eval_every and done % s.eval_every == 0 and done < s.steps:
                whole.eval()
                with precision():
                    scores = evaluate_fn(whole) if evaluate_fn else eval_metrics(ctx, whole, step=done, kl=kl)
                record.update({f"eval/{d}": v["score"] for d, v in scores.items()})
                whole.train()
            log.write(record)
            ctx.hooks.progress(done, s.steps, metrics)
            if done % s.checkpoint_every == 0 and done < s.steps:
                opt_state = learner.optimizer_state(opt)  # every rank: under FSDP they gather it
                if learner.lead:
                    path = ctx.stage_dir / CHECKPOINTS / f"step-{done:07d}"
                    save_checkpoint(path, whole, ctx.tokenizer,
                                    lineage(ctx, done, {"elapsed_seconds": round(time.time() - t0, 3)}),
                                    trainer_state={"optimizer": opt_state, "step": done, "totals": dict(totals),
                                                   "rng": rng_state(), "skipped": skipped})
                    prune_resumable(ctx.stage_dir)
            if learner.lead and s.keep_every and done % s.keep_every == 0 and done < s.steps:
                # an HF snapshot only (no optimizer state); a resumed stage rewrites it identically
                save_checkpoint(snapshot_path(ctx.stage_dir, done), whole, ctx.tokenizer,
                                lineage(ctx, done, dict(totals)))
        model.eval()
        if not learner.lead:
            return ctx.stage_dir / FINAL  # rank 0 writes it
        whole.eval()
        with precision():
            final_eval = evaluate_fn(whole) if evaluate_fn else eval_metrics(ctx, whole, step=s.steps, kl=kl)
        log.write({"step": s.steps, **totals, **{f"eval/{d}": v["score"] for d, v in final_eval.items()}})
    finally:
        log.close()
    final = save_checkpoint(ctx.stage_dir / FINAL, whole, ctx.tokenizer,
                            final_lineage(ctx, s.steps, {"eval": final_eval, **totals}))
    shutil.rmtree(ctx.stage_dir / CHECKPOINTS, ignore_errors=True)
    return final
