"""Staged teachers: a MOPD stage distils from earlier teacher snapshots first, then later ones.

Why: a student far from a fully trained teacher sees large, noisy reverse-KL advantages; a schedule of the
teachers' intermediate checkpoints (kept by the teacher stage's `keep_every`) gives it nearer targets first.
The phase of a step is a function of the step alone, so a resumed stage loads the same teachers.
"""

from __future__ import annotations

from ..models.checkpoint import load_model
from ..recipe.schema import MOPDStage, TeacherPhase
from ..teachers.panel import TeacherPanel
from .context import StageContext
from .train import teacher_checkpoint


class ScheduledPanel:
    """The teacher panel of a step; loads the next phase's snapshots when a step crosses a phase boundary."""

    def __init__(self, ctx: StageContext):
        s: MOPDStage = ctx.settings
        self.ctx = ctx
        self.phases = s.teacher_schedule or [TeacherPhase(until_step=s.steps, snapshot="final")]
        self.phase: int | None = None
        self.panel: TeacherPanel | None = None

    def phase_of(self, step: int) -> int:
        """Index of the phase of 0-based `step`: the first whose until_step is after it."""
        return next(i for i, ph in enumerate(self.phases) if step < ph.until_step)

    def at(self, step: int) -> TeacherPanel:
        i = self.phase_of(step)
        if i != self.phase or self.panel is None:
            s: MOPDStage = self.ctx.settings
            models = {}
            for teacher in sorted(set(s.teachers.values())):
                path = teacher_checkpoint(self.ctx.model_refs[teacher], self.phases[i].snapshot)
                m = load_model(path)
                m.eval().requires_grad_(False)
                models[teacher] = m
            self.panel, self.phase = TeacherPanel(models=models, teacher_of_domain=s.teachers), i
        return self.panel
