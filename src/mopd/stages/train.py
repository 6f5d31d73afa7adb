"""The training driver every trainable stage shares: resume, optimizer, schedule, logging, eval, checkpoints.

A stage plugs in only `loss_fn(model, step) -> (loss, metrics)`. Everything random in a step is derived from
(seed, step), so a stage resumed from its last checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import __version__
from ..envs import Problem, get_domain
from ..eval.evaluate import evaluate
from ..models.checkpoint import (
    is_checkpoint,
    load_model,
    load_trainer_state,
    save_checkpoint,
)
from .context import StageContext

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.jsonl"


def step_seed(seed: int, step: int, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{salt}".encode()).digest()[:8], "little") >> 1


def step_rng(seed: int, step: int) -> random.Random:
    return random.Random(step_seed(seed, step, "problems"))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step, "sampling"))


class ProblemSource:
    """Training problems for a stage: balanced over its domains, never a held-out eval prompt."""

    def __init__(self, ctx: StageContext):
        self.domains = [get_domain(d) for d in ctx.domains]
        ev = ctx.recipe.eval
        self.exclude = {d.name: d.held_out_prompts(ev.size, seed=ev.seed) for d in self.domains}
        self.difficulties = getattr(ctx.settings, "difficulties", None)

    def draw(self, rng: random.Random, n: int) -> list[Problem]:
        out = []
        for i in range(n):
            d = self.domains[i % len(self.domains)]
            levels = [x for x in (self.difficulties or d.difficulties) if x in d.difficulties] or list(d.difficulties)
            out += d.sample_train(rng, 1, difficulty=rng.choice(levels), exclude=self.exclude[d.name])
        rng.shuffle(out)
        return out


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    return base


def latest_checkpoint(stage_dir: Path) -> Path | None:
    ckpts = sorted(p for p in (stage_dir / CHECKPOINTS).glob("step-*") if is_checkpoint(p))
    return ckpts[-1] if ckpts else None


class MetricsLog:
    """metrics.jsonl of a stage; on resume, lines past the resumed step are dropped (they will be redone)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
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

    def close(self) -> None:
        self.f.close()


def eval_metrics(ctx: StageContext, model) -> dict[str, dict[str, float]]:
    ev = ctx.recipe.eval
    return evaluate(model, ctx.tokenizer, ctx.recipe.domains, size=ev.size, seed=ev.seed,
                    max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)


def lineage(ctx: StageContext, step: int, metrics: dict) -> dict:
    return {
        "stage": ctx.name,
        "kind": ctx.settings.kind,
        "identity": ctx.identity,
        "parents": ctx.parents,
        "init": ctx.init_path,
        "seed": ctx.seed,
        "step": step,
        "version": __version__,
        "settings": ctx.settings.model_dump(mode="json"),
        "metrics": metrics,
    }


def train(ctx: StageContext, model_factory: Callable[[], torch.nn.Module],
          loss_fn: Callable[[torch.nn.Module, int], tuple[torch.Tensor, dict[str, float]]]) -> Path:
    """Run (or resume) the stage's steps and write its final checkpoint; returns the final checkpoint path."""
    s = ctx.settings
    torch.manual_seed(ctx.seed)
    resume_from = latest_checkpoint(ctx.stage_dir)
    model = load_model(resume_from) if resume_from else model_factory()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.99))
    start = 0
    if resume_from:
        state = load_trainer_state(resume_from)
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    log = MetricsLog(ctx.stage_dir / METRICS, start)
    t0 = time.time()
    try:
        for step in range(start, s.steps):
            lr = lr_at(step, s.steps, s.lr, s.warmup_steps, s.schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, metrics = loss_fn(model, step)
            if loss.requires_grad:  # a batch with no learning signal (e.g. all-equal GRPO groups) skips the update
                loss.backward()
                if s.grad_clip:
                    metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip))
                opt.step()
                opt.zero_grad(set_to_none=True)
            done = step + 1
            record = {"step": done, "lr": lr, "time": round(time.time() - t0, 3), **metrics}
            if s.eval_every and done % s.eval_every == 0 and done < s.steps:
                model.eval()
                record.update({f"eval/{d}": v["score"] for d, v in eval_metrics(ctx, model).items()})
                model.train()
            log.write(record)
            if ctx.on_progress:
                ctx.on_progress(done, s.steps, metrics)
            if done % s.checkpoint_every == 0 and done < s.steps:
                path = ctx.stage_dir / CHECKPOINTS / f"step-{done:07d}"
                save_checkpoint(path, model, ctx.tokenizer, lineage(ctx, done, {}),
                                trainer_state={"optimizer": opt.state_dict(), "step": done})
                for old in sorted((ctx.stage_dir / CHECKPOINTS).glob("step-*"))[:-1]:
                    shutil.rmtree(old, ignore_errors=True)
        model.eval()
        final_eval = eval_metrics(ctx, model)
        log.write({"step": s.steps, **{f"eval/{d}": v["score"] for d, v in final_eval.items()}})
    finally:
        log.close()
    final = save_checkpoint(ctx.stage_dir / FINAL, model, ctx.tokenizer,
                            lineage(ctx, s.steps, {"eval": final_eval}))
    shutil.rmtree(ctx.stage_dir / CHECKPOINTS, ignore_errors=True)
    return final
