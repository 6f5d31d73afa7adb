"""The prompted stage: its `init` model with a system prompt and worked examples, written as a teacher checkpoint;
and the model stage, the same without a prompt (a released model as the recipe's start).

No training. The checkpoint is the model's own weights plus `teacher_prompt.json`, and its held-out scores are
measured with the prompt (what it knows as a teacher), so the report's teacher column and the teacher-gain gate
read it like any other teacher. A MOPD stage that routes to it scores the student's completions after the
teacher's rendering of each prompt (`teachers.prompted`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.run_dir import FINAL, METRICS
from ..core.schema import ModelStage, PromptedStage
from ..models.checkpoint import load_model, save_checkpoint
from ..models.precision import compute_precision
from ..models.prompting import PromptContext, write_teacher_prompt
from ..teachers.prompted import prefix_tokens
from .driver import eval_metrics
from .lineage import final_lineage
from .resolved import ResolvedStage


def stage_context(s: PromptedStage | ModelStage) -> PromptContext | None:
    if isinstance(s, ModelStage):
        return None
    return PromptContext(s.system, tuple((e.prompt, e.answer) for e in s.examples))


def run_prompted(ctx: ResolvedStage) -> Path:
    context = stage_context(ctx.settings)
    model = load_model(ctx.init_path)  # float32, as it is saved
    p = ctx.placement
    model.to(p.device).eval()
    fmt = ctx.prompt_format.with_context(context)
    with compute_precision(p.device, p.compute_dtype, torch.float32):
        final_eval = eval_metrics(ctx, model, ctx.tokenizer, fmt)
    totals = {"samples": 0, "teacher_samples": 0,
              "prompt_prefix_tokens": int(prefix_tokens(ctx.tokenizer, ctx.prompt_format, fmt, [""]))}
    record = {"step": 0, **totals, **{f"eval/{d}": v["score"] for d, v in final_eval.items()}}
    (ctx.stage_dir / METRICS).write_text(json.dumps(record, sort_keys=True) + "\n")
    return save_checkpoint(ctx.stage_dir / FINAL, model.float().cpu(), ctx.tokenizer,
                           final_lineage(ctx, 0, {"eval": final_eval, **totals}),
                           extra=None if context is None else lambda tmp: write_teacher_prompt(tmp, context))
