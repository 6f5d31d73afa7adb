"""The MOPD stage's wiring: its teachers (loaded once, placed, tokenizer-checked), the staged-teacher schedule,
the preflight, and the policy step with a teacher panel.

Staged teachers: a MOPD stage may distil from earlier teacher snapshots first, then later ones. Why: a student
far from a fully trained teacher sees large, noisy reverse-KL advantages; a schedule of the teachers'
intermediate checkpoints (kept by the teacher stage's `keep_every`) gives it nearer targets first. The phase of
a step is a function of the step alone, so a resumed stage loads the same teachers. Every phase's teacher
tokenizers are checked before step 0 (tokenizer files only), and every teacher a stage scores with is loaded by
`load_teachers`, so a snapshot gets the same precision and placement as a final teacher; the preflight measures
the teachers the first step distils from, and training goes on with that very panel, so no teacher is loaded
twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.run_dir import PREFLIGHT
from ..core.schema import ActorBackend, HttpBackend, MOPDStage, fixed_logit_chunk
from ..core.scoring import TeacherScorer
from ..envs.tool_domains import is_agentic
from ..models.checkpoint import load_model, load_tokenizer, write_json_atomic
from ..models.prompting import read_teacher_prompt, with_pad_token
from ..models.tokenizer import tokenizer_fingerprint
from ..teachers.actor import start_actors
from ..teachers.cross_tokenizer import CrossTokenizer, ForeignTeacher, PanelTeacher
from ..teachers.http import connect_all
from ..teachers.offload import teachers_fit
from ..teachers.panel import TeacherPanel
from ..teachers.preflight import PreflightError, RolloutSettings, check_tokenizers, run_preflight
from ..teachers.prompted import PromptedRemote, reprompter, teacher_formats
from ..teachers.remote import MixedPanel
from .driver import train
from .loading import load_placed
from .problems import ProblemSource, problem_source
from .resolved import ResolvedStage
from .rl import policy_step_fn, policy_workers
from .samples import teacher_kl
from .start import starting_model
from .teacher_gate import check_teacher_gain


def run_mopd(ctx: ResolvedStage) -> Path:
    s: MOPDStage = ctx.settings
    source = problem_source(ctx)
    schedule = TeacherSchedule(ctx)
    gains = check_teacher_gain(ctx, s.preflight.min_teacher_gain) if s.preflight.min_teacher_gain is not None else None
    # every phase's tokenizers now (no weights): a mismatch in a late phase fails before step 0
    check_teacher_tokenizers(ctx, [pair for i in range(len(schedule.phases)) for pair in schedule.checkpoints(i)])
    due = s.preflight.enabled and not (ctx.stage_dir / PREFLIGHT).exists()
    if due or not s.teacher_schedule:  # a resumed scheduled stage loads its phase's teachers at its first step
        first = schedule.at(0)  # the teachers of step 0, loaded once: training goes on with this panel
        if due:
            preflight(ctx, first, dict(schedule.checkpoints(0)), source, gains)
    with policy_workers(ctx) as workers:
        return train(ctx, starting_model(ctx), policy_step_fn(ctx, lambda step: source, schedule.at, workers),
                     kl=teacher_kl(ctx, schedule.at))  # the evals' transcripts carry each turn's teacher KL


class TeacherSchedule:
    """The teacher panel of a step; loads the next phase's checkpoints when a step crosses a phase boundary.

    Without a `teacher_schedule` there is one phase: the final teachers for every step.
    """

    def __init__(self, ctx: ResolvedStage):
        s: MOPDStage = ctx.settings
        self.ctx = ctx
        self.phases = [ph.until_step for ph in s.teacher_schedule] if s.teacher_schedule else [s.steps]
        self.phase: int | None = None
        self.panel: TeacherScorer | None = None

    def phase_of(self, step: int) -> int:
        """Index of the phase of 0-based `step`: the first whose until_step is after it."""
        return next(i for i, until in enumerate(self.phases) if step < until)

    def checkpoints(self, phase: int) -> list[tuple[str, str]]:
        """(teacher name, checkpoint) of phase `phase`, in name order: a kept snapshot or the final directory."""
        return [(name, t.phases[phase] if t.phases else t.checkpoint) for name, t in sorted(self.ctx.teachers.items())]

    def at(self, step: int) -> TeacherScorer:
        """The panel of 0-based `step`; crossing into a new phase replaces the previous phase's teachers."""
        i = self.phase_of(step)
        if i != self.phase or self.panel is None:
            self.panel = None  # let the previous phase's teachers go before the next ones take memory
            self.panel, self.phase = teacher_panel(self.ctx, dict(self.checkpoints(i))), i
        return self.panel


def check_teacher_tokenizers(ctx: ResolvedStage, checkpoints: Iterable[tuple[str, str]]) -> None:
    """Refuse a teacher whose tokenizer differs from the student's, reading tokenizer files only (no weights).

    `checkpoints`: (teacher name, directory) pairs, several per name for a `teacher_schedule`'s phases. Raises the
    preflight's one-line error naming what differs (the CLI prints a PreflightError as one line). Hub ids that
    recipe validation could not check without downloading are checked here.
    """
    student_tok = load_tokenizer(ctx.init_path) if ctx.init_path else ctx.tokenizer
    student_fp = tokenizer_fingerprint(student_tok)
    served = {n for n, b in ctx.settings.teacher_backends.items() if isinstance(b, HttpBackend)}
    for name, ref in checkpoints:
        if name in ctx.settings.cross_tokenizer:  # scored in its own tokens (`teachers.cross_tokenizer`)
            continue
        if name in served:  # its server's tokenizer is checked when the panel connects (`teachers.http.connect`)
            continue
        teacher_tok = load_tokenizer(ref)
        if tokenizer_fingerprint(teacher_tok) != student_fp:
            label = f"stage {ctx.name!r}: teacher {name!r} ({ref})"
            check_tokenizers(student_tok, teacher_tok, label)
            raise PreflightError(f"{label}: uses a different tokenizer from the student")


def load_teachers(
    ctx: ResolvedStage, checkpoints: Mapping[str, str]
) -> tuple[dict[str, torch.nn.Module], torch.device | None]:
    """Frozen teachers and the device they score on (the `compute_device` of a `TeacherPanel`).

    teacher_device `same`: resident on the student's device (compute_device None). `cpu`: kept on CPU and moved
    to the student's device per scoring call. `auto`: same if they fit beside the student (`teachers_fit`).
    """
    device, dtype = ctx.placement.device, ctx.placement.compute_dtype
    models = {name: load_model(ref, dtype=dtype).eval().requires_grad_(False) for name, ref in checkpoints.items()}
    mode = ctx.placement.teacher_device
    if mode == "auto":
        biggest = max((sum(p.numel() * p.element_size() for p in m.parameters()) for m in models.values()), default=0)
        mode = "same" if teachers_fit(list(models.values()), device, reserve_bytes=biggest) else "cpu"
    if mode == "same":
        for m in models.values():
            m.to(device)
        return models, None
    return models, device


def teacher_panel(ctx: ResolvedStage, checkpoints: Mapping[str, str]) -> TeacherScorer:
    """The stage's panel over the teachers of `checkpoints`, routed by the stage's `teachers`: in this process,
    or where its `teacher_backends` puts them (Ray actors started and HTTP servers checked here, before step 0:
    a problem is one `PreflightError` line). A teacher of another tokenizer (`cross_tokenizer`) scores wherever
    it runs, behind a `ForeignTeacher` that re-reads each row in its tokens."""
    s: MOPDStage = ctx.settings
    backends = s.teacher_backends
    foreign = {n: cross_reader(ctx, ref) for n, ref in checkpoints.items() if n in s.cross_tokenizer}
    in_process = {n: ref for n, ref in checkpoints.items() if n not in backends and n not in foreign}
    views = {n: reprompter(ctx.tokenizer, fmt) for n, fmt in teacher_formats(checkpoints, ctx.prompt_format).items()
             if n not in foreign}
    local = local_panel(ctx, in_process, {n: v for n, v in views.items() if n in in_process}) if in_process else None
    if not backends and not foreign:
        return local
    actors = {n: b for n, b in backends.items() if isinstance(b, ActorBackend) and n in checkpoints}
    served = {n: b for n, b in backends.items() if isinstance(b, HttpBackend) and n in checkpoints}
    student_tok = load_tokenizer(ctx.init_path) if ctx.init_path else ctx.tokenizer
    remote = {**connect_all(ctx.name, served, student_tok, {n: foreign[n].teacher_tok for n in served if n in foreign}),
              **(start_actors(ctx.name, checkpoints, actors, ctx.placement.compute_dtype,
                              fixed_logit_chunk(s), s.teacher_shared_prefill is True) if actors else {})}
    here = {n: ref for n, ref in checkpoints.items() if n in foreign and n not in backends}
    if here:  # in-process teachers of another tokenizer: a panel of their own, scoring their token batches
        panel = local_panel(ctx, here, {})
        remote.update({n: PanelTeacher(panel, n) for n in here})
    remote = {n: ForeignTeacher(t, foreign[n]) if n in foreign else PromptedRemote(t, views[n]) if n in views else t
              for n, t in remote.items()}
    return MixedPanel(local=local, remote=remote, teacher_of_domain=ctx.teacher_of_domain)


def local_panel(ctx: ResolvedStage, checkpoints: Mapping[str, str], views: Mapping[str, Any]) -> TeacherPanel:
    """The in-process panel of `checkpoints`, with the stage's step settings."""
    models, compute_device = load_teachers(ctx, checkpoints)
    return TeacherPanel(models=models, teacher_of_domain=ctx.teacher_of_domain, compute_device=compute_device,
                        logit_chunk=fixed_logit_chunk(ctx.settings),
                        share_prefill=ctx.settings.teacher_shared_prefill is True, reprompt=dict(views))


def cross_reader(ctx: ResolvedStage, ref: str) -> CrossTokenizer:
    """How a teacher of another tokenizer reads the student's rows: its own tokenizer, and the recipe's prompt
    rendering (`chat_template`) applied to it, after its system prompt and examples if it is a prompted teacher."""
    teacher_tok = with_pad_token(load_tokenizer(ref))
    fmt = ctx.rendering.format_for(teacher_tok)
    if (context := read_teacher_prompt(ref)) is not None:
        fmt = fmt.with_context(context)
    tools = {d.name: d.tools for d in ctx.domains if is_agentic(d)}  # shown to a chat template, as the sampler does
    return CrossTokenizer(ctx.tokenizer, teacher_tok, fmt, student_width=logit_width(ctx.init_path), tools=tools)


def logit_width(checkpoint: str | None) -> int | None:
    """The columns of a checkpoint's logits (its config's vocab_size, often padded past its tokenizer): a teacher
    of another tokenizer's distributions are put in that many student columns (`models.shared_vocab`)."""
    if checkpoint is None:
        return None
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(checkpoint), "vocab_size", None)


def local_part(panel: TeacherScorer) -> TeacherPanel | None:
    """The in-process teachers of a panel (the preflight's exact KL; remote ones get its sampled estimate)."""
    return panel.local if isinstance(panel, MixedPanel) else panel  # type: ignore[return-value]


def preflight(ctx: ResolvedStage, panel: TeacherScorer, checkpoints: Mapping[str, str], source: ProblemSource,
              gains: Mapping[str, Any] | None = None) -> None:
    """Teacher-student compatibility check before the first MOPD step; its result is <stage>/preflight.json.

    `panel` holds the teachers loaded from `checkpoints` (teacher name -> directory): the first phase's.
    `gains`: the teacher-gain gate's figures (`teacher_gate`), recorded beside the KLs when the gate is on.

    Skipped (by the caller) when that file exists: a resumed stage was already checked (a stale stage directory
    is moved aside by the runner, so an existing file belongs to this very stage identity).
    """
    s: MOPDStage = ctx.settings
    local = local_part(panel)
    student = load_placed(ctx, ctx.init_path).eval()  # the stage's device and precision, as it will train
    result = run_preflight(
        stage=ctx.name,
        student=student,
        tokenizer=ctx.tokenizer,
        student_tok=load_tokenizer(ctx.init_path),
        teachers=dict(local.models) if local else {},
        teacher_toks={name: load_tokenizer(checkpoints[name]) for name in (local.models if local else {})},
        teacher_of_domain=ctx.teacher_of_domain,
        domains=ctx.domains,
        settings=RolloutSettings(prompts=s.preflight.prompts, max_new_tokens=s.max_new_tokens,
                                 temperature=s.temperature, top_p=s.top_p),
        kl_warn=s.preflight.kl_warn,
        seed=ctx.seed,
        exclude=source.exclude,
        warn=ctx.hooks.warn,
        compute_device=local.compute_device if local else None,  # offloaded teachers score where they train
        remote={name: (lambda batch, t=t: t.sampled(batch)())
                for name, t in (panel.remote.items() if isinstance(panel, MixedPanel) else ())},
        prompt_format=ctx.prompt_format,
        teacher_formats={n: f for n, f in teacher_formats(checkpoints, ctx.prompt_format).items()
                         if n not in s.cross_tokenizer},
        foreign={n: t for n, t in getattr(panel, "remote", {}).items() if isinstance(t, ForeignTeacher)},
    )
    del student  # training loads its own copy (or resumes)
    if s.teacher_backends:  # connected (and tokenizer-checked) when the panel was made; KL: a sampled estimate
        result["remote_teachers"] = {n: b.backend for n, b in sorted(s.teacher_backends.items())}
        served = {n: getattr(t, "inner", t) for n, t in getattr(panel, "remote", {}).items()}
        result["served_teachers"] = {n: {"urls": t.backend.urls, "scoring": t.scoring} for n, t in sorted(
            served.items()) if hasattr(t, "scoring")}
    if gains is not None:
        result["teacher_gain"] = {"min": s.preflight.min_teacher_gain, "domains": dict(gains)}
    write_json_atomic(ctx.stage_dir / PREFLIGHT, result)
