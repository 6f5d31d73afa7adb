"""Staged teachers: a MOPD stage distils from earlier teacher snapshots first, then later ones.

Why: a student far from a fully trained teacher sees large, noisy reverse-KL advantages; a schedule of the
teachers' intermediate checkpoints (kept by the teacher stage's `keep_every`) gives it nearer targets first.
The phase of a step is a function of the step alone, so a resumed stage loads the same teachers. Snapshots are
loaded as the final teachers are (`placement.teacher_panel`): in the stage's precision, placed as the recipe's
`teacher_device` says, and refused if their tokenizer differs from the student's.
"""

from __future__ import annotations

from ..recipe.schema import MOPDStage, TeacherPhase
from ..teachers.panel import TeacherPanel
from .context import StageContext
from .placement import teacher_panel
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

    def checkpoints(self, phase: int) -> dict[str, str]:
        """Teacher name -> the checkpoint phase `phase` scores with (a kept snapshot, or the final directory)."""
        s: MOPDStage = self.ctx.settings
        snapshot = self.phases[phase].snapshot
        return {t: teacher_checkpoint(self.ctx.model_refs[t], snapshot) for t in sorted(set(s.teachers.values()))}

    def at(self, step: int) -> TeacherPanel:
        """The panel of 0-based `step`; crossing into a new phase replaces the previous phase's teachers."""
        i = self.phase_of(step)
        if i != self.phase or self.panel is None:
            self.panel = None  # let the previous phase's teachers go before the next ones take memory
            self.panel, self.phase = teacher_panel(self.ctx, self.checkpoints(i)), i
        return self.panel
