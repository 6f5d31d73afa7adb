"""Each stage kind as a short composition of the learner parts: a model factory and a loss per step."""

from __future__ import annotations

import json
from pathlib import Path

from ..learner.step import PolicySettings, policy_loss, supervised_loss
from ..models.checkpoint import load_model, write_json_atomic
from ..models.tiny import build_tiny_model
from ..recipe.schema import EvalStage, MOPDStage, PretrainStage, RLVRStage, SFTStage
from ..teachers.panel import TeacherPanel
from .context import StageContext
from .train import FINAL, ProblemSource, eval_metrics, lineage, step_generator, step_rng, train


def _policy_settings(s: RLVRStage | MOPDStage) -> PolicySettings:
    return PolicySettings(
        group_size=s.group_size, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
        is_mode=s.is_mode, eps_low=s.eps_low, eps_high=s.eps_high, adv_clip=s.adv_clip,
        alpha=getattr(s, "alpha", 0.0),
        objective=getattr(s, "objective", "sampled"),
        topk=getattr(s, "topk", 16),
        jsd_beta=getattr(s, "jsd_beta", 0.5),
    )


def _init_model(ctx: StageContext):
    s = ctx.settings
    if isinstance(s, PretrainStage) and s.model is not None:
        return build_tiny_model(s.model, len(ctx.tokenizer), ctx.tokenizer, ctx.seed)
    return load_model(ctx.init_path)


def run_stage(ctx: StageContext) -> Path:
    """Run one stage to completion (resuming if it was interrupted); returns its final checkpoint or output."""
    s = ctx.settings
    if isinstance(s, EvalStage):
        return _run_eval(ctx)
    source = ProblemSource(ctx)
    if isinstance(s, PretrainStage | SFTStage):
        on_prompt = isinstance(s, PretrainStage)

        def loss_fn(model, step):
            problems = source.draw(step_rng(ctx.seed, step), s.batch_size)
            return supervised_loss(model, ctx.tokenizer, problems, loss_on_prompt=on_prompt)

        return train(ctx, lambda: _init_model(ctx), loss_fn)

    settings = _policy_settings(s)
    panel = None
    if isinstance(s, MOPDStage):
        models = {}
        for teacher in sorted(set(s.teachers.values())):
            m = load_model(ctx.model_refs[teacher])
            m.eval().requires_grad_(False)
            models[teacher] = m
        panel = TeacherPanel(models=models, teacher_of_domain=s.teachers)

    def policy_fn(model, step):
        problems = source.draw(step_rng(ctx.seed, step), s.batch_size)
        return policy_loss(model, ctx.tokenizer, problems, settings, step_generator(ctx.seed, step), panel)

    return train(ctx, lambda: _init_model(ctx), policy_fn)


def _run_eval(ctx: StageContext) -> Path:
    s: EvalStage = ctx.settings
    results = {}
    for ref in s.models:
        model = load_model(ctx.model_refs[ref])
        model.eval()
        results[ref] = eval_metrics(ctx, model)
        if s.domains:
            results[ref] = {d: v for d, v in results[ref].items() if d in s.domains}
    out = ctx.stage_dir / FINAL
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "eval.json", results)
    write_json_atomic(out / "mopd.json", lineage(ctx, 0, {"eval": results}))
    (ctx.stage_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval": results}) + "\n")
    return out
