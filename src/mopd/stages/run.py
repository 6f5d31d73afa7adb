"""Each stage kind as a short composition of the learner parts: a model factory and a loss per step."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from ..learner.step import PolicySettings, policy_loss, supervised_loss
from ..models.checkpoint import load_tokenizer, write_json_atomic
from ..models.tiny import build_tiny_model
from ..recipe.schema import (
    CascadeRLStage,
    EvalStage,
    MergeStage,
    MOPDStage,
    OffPolicyFTStage,
    PretrainStage,
    RLVRStage,
    SFTStage,
)
from ..teachers.preflight import RolloutSettings, run_preflight
from .baselines import cascade_sources, offpolicy_loss_fn
from .context import StageContext
from .merge import run_merge
from .placement import (
    check_teacher_tokenizers,
    lazy_rollout_sampler,
    load_placed,
    stage_tokenizer,
    teacher_panel,
)
from .schedules import temperature_at
from .teacher_schedule import ScheduledPanel
from .train import FINAL, ProblemSource, eval_metrics, lineage, step_generator, step_rng, train

PREFLIGHT_FILE = "preflight.json"


def _policy_settings(s: RLVRStage | MOPDStage | CascadeRLStage) -> PolicySettings:
    return PolicySettings(
        group_size=s.group_size, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
        is_mode=s.is_mode, eps_low=s.eps_low, eps_high=s.eps_high, adv_clip=s.adv_clip,
        alpha=getattr(s, "alpha", 0.0),
        objective=getattr(s, "objective", "sampled"),
        topk=getattr(s, "topk", 16),
        jsd_beta=getattr(s, "jsd_beta", 0.5),
        surprise_alpha=getattr(s, "surprise_alpha", 0.0),
        filter_solved=s.filter_solved,
        micro_batch_size=s.micro_batch_size,
    )


def _init_model(ctx: StageContext, dtype: torch.dtype):
    s = ctx.settings
    if isinstance(s, PretrainStage) and s.model is not None:
        return build_tiny_model(s.model, len(ctx.tokenizer), ctx.tokenizer, ctx.seed)
    return load_placed(ctx, ctx.init_path, dtype)


def run_stage(ctx: StageContext) -> Path:
    """Run one stage to completion (resuming if it was interrupted); returns its final checkpoint or output."""
    s = ctx.settings
    if isinstance(s, EvalStage):
        return _run_eval(ctx)
    if isinstance(s, MergeStage):
        return run_merge(ctx)
    if isinstance(s, OffPolicyFTStage):
        return train(ctx, lambda dtype: _init_model(ctx, dtype), offpolicy_loss_fn(ctx))
    source = ProblemSource(ctx)
    if isinstance(s, PretrainStage | SFTStage):
        on_prompt = isinstance(s, PretrainStage)

        def loss_fn(model, step):
            problems = source.draw(step_rng(ctx.seed, step), s.batch_size)
            return supervised_loss(model, ctx.tokenizer, problems, loss_on_prompt=on_prompt,
                                   micro_batch_size=s.micro_batch_size)

        return train(ctx, lambda dtype: _init_model(ctx, dtype), loss_fn)

    # rlvr, mix_rl (rlvr on every domain), cascade_rl (rlvr on the step's domain) and mopd share one step
    settings = _policy_settings(s)
    panel = None
    scheduled = ScheduledPanel(ctx) if isinstance(s, MOPDStage) and s.teacher_schedule else None
    source_at = cascade_sources(ctx) if isinstance(s, CascadeRLStage) else (lambda step: source)
    if isinstance(s, MOPDStage):
        if scheduled:  # every phase's tokenizers now (no weights): a mismatch in a late phase fails before step 0
            check_teacher_tokenizers(ctx, [pair for phase in range(len(scheduled.phases))
                                           for pair in scheduled.checkpoints(phase).items()])
        if not scheduled or _preflight_due(ctx):
            # resident on the student's device, or kept on CPU and moved there per scoring call (teacher_device)
            panel = teacher_panel(ctx, {t: ctx.model_refs[t] for t in sorted(set(s.teachers.values()))})
            _preflight(ctx, dict(panel.models), source, panel.compute_device)
        if scheduled:
            panel = None  # the schedule loads its own teachers per phase; the final ones served the preflight only

    rollouts = lazy_rollout_sampler(ctx)  # torch sampler, or vLLM (recipe `rollout_backend`), built on first use

    def policy_fn(model, step):
        problems = source_at(step).draw(step_rng(ctx.seed, step), s.batch_size, step=step)
        temperature = temperature_at(step, s.steps, s.temperature, s.temperature_end, s.temperature_schedule)
        step_settings = replace(settings, temperature=temperature)
        step_panel = scheduled.at(step) if scheduled else panel
        loss, metrics = policy_loss(model, ctx.tokenizer, problems, step_settings, step_generator(ctx.seed, step),
                                    step_panel, sampler=rollouts())
        return loss, {**metrics, "samples/student": len(problems) * s.group_size}

    return train(ctx, lambda dtype: _init_model(ctx, dtype), policy_fn)


def _preflight_due(ctx: StageContext) -> bool:
    return ctx.settings.preflight.enabled and not (ctx.stage_dir / PREFLIGHT_FILE).exists()


def _preflight(
    ctx: StageContext, teachers: dict, source: ProblemSource, compute_device: torch.device | None = None
) -> None:
    """Teacher-student compatibility check before the first MOPD step; its result is <stage>/preflight.json.

    Skipped when that file exists: a resumed stage was already checked (a stale stage directory is moved aside
    by the runner, so an existing file belongs to this very stage identity).
    """
    s: MOPDStage = ctx.settings
    if not _preflight_due(ctx):
        return
    student = load_placed(ctx, ctx.init_path).eval()  # the stage's device and precision, as it will train
    result = run_preflight(
        stage=ctx.name,
        student=student,
        tokenizer=ctx.tokenizer,
        student_tok=load_tokenizer(ctx.init_path),
        teachers=teachers,
        teacher_toks={t: load_tokenizer(ctx.model_refs[t]) for t in teachers},
        teacher_of_domain=s.teachers,
        domains=ctx.domains,
        settings=RolloutSettings(prompts=s.preflight.prompts, max_new_tokens=s.max_new_tokens,
                                 temperature=s.temperature, top_p=s.top_p),
        kl_warn=s.preflight.kl_warn,
        seed=ctx.seed,
        exclude=source.exclude,
        warn=ctx.on_warning or logging.getLogger("mopd").warning,
        compute_device=compute_device,  # offloaded teachers score on the student's device, as in training
    )
    del student  # training loads its own copy (or resumes)
    write_json_atomic(ctx.stage_dir / PREFLIGHT_FILE, result)


def _run_eval(ctx: StageContext) -> Path:
    s: EvalStage = ctx.settings
    results = {}
    for ref in s.models:
        # each model with its own tokenizer and the recipe's prompt rendering: a Hugging Face model scored with
        # the recipe's character tokenizer would be scored on garbage ids
        model = load_placed(ctx, ctx.model_refs[ref]).eval()
        tokenizer = stage_tokenizer(ctx.recipe, ctx.tokenizer, ctx.model_refs[ref])
        results[ref] = eval_metrics(ctx, model, tokenizer)
        if s.domains:
            results[ref] = {d: v for d, v in results[ref].items() if d in s.domains}
    out = ctx.stage_dir / FINAL
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "eval.json", results)
    write_json_atomic(out / "mopd.json", lineage(ctx, 0, {"eval": results}))
    (ctx.stage_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval": results}) + "\n")
    return out
