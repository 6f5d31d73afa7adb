"""The merge stage: teachers' parameters merged into one checkpoint, no training (a baseline of the MOPD paper).

It writes what every stage writes, so reports and `init:` references treat it like any other stage: an HF
checkpoint in `final/` with `mopd.json` lineage (eval metrics included) and a one-record metrics.jsonl
(0 student samples: merging samples nothing).

The merge itself runs on the host in float64 and the checkpoint keeps float32 weights; the merged model is then
evaluated on the stage's device in its compute precision (autocast over the float32 weights, as a trained stage's
final evaluation runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.run_dir import FINAL, METRICS
from ..core.schema import MergeStage
from ..models.checkpoint import load_model, save_checkpoint
from ..models.merge import merge_state_dicts
from ..models.precision import compute_precision
from .driver import eval_metrics
from .lineage import final_lineage
from .resolved import ResolvedStage


def run_merge(ctx: ResolvedStage) -> Path:
    s: MergeStage = ctx.settings
    model = load_model(ctx.model_refs[s.base])
    base_sd = model.state_dict()
    others = [load_model(ctx.model_refs[m]).state_dict() for m in s.models]
    try:
        merged = merge_state_dicts(base_sd, others, s.method, s.lam)
    except ValueError as e:  # e.g. a shape mismatch between merged checkpoints
        raise ValueError(f"stage {ctx.name!r}: cannot merge {', '.join(s.models)}: {e}") from None
    model.load_state_dict(merged)
    p = ctx.placement
    model.to(p.device).eval()
    with compute_precision(p.device, p.compute_dtype, torch.float32):
        final_eval = eval_metrics(ctx, model)
    totals = {"samples": 0, "teacher_samples": 0}
    record = {"step": 0, **totals, **{f"eval/{d}": v["score"] for d, v in final_eval.items()}}
    (ctx.stage_dir / METRICS).write_text(json.dumps(record, sort_keys=True) + "\n")
    return save_checkpoint(ctx.stage_dir / FINAL, model, ctx.tokenizer,
                           final_lineage(ctx, 0, {"eval": final_eval, **totals}))
