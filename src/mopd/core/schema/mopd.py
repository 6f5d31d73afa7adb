"""The `mopd` stage kind: multi-teacher on-policy distillation, with what only it has (teachers, their
snapshots and backends, the preflight check, the distillation objective).

Its rules over its own settings are validators here, so a mistake is refused when the schema reads the stage,
located at the offending key; rules that need the rest of the recipe (its domains, the teachers' stages) are the
loader's (`recipe.stage_checks`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .bounds import GROUP_MAX
from .stages import SamplingSettings, TrainStage
from .strict import Strict, rule_error
from .teachers import TeacherBackend, backend_problem


class TeacherPhase(Strict):
    """Until `until_step` (exclusive), every teacher is its `snapshot` (a kept step, or `final`)."""

    until_step: int = Field(gt=0)
    snapshot: int | str = Field(description="a step the teachers kept (keep_every), or final")

    @field_validator("snapshot")
    @classmethod
    def _step_or_final(cls, v: int | str) -> int | str:
        if (isinstance(v, str) and v != "final") or (isinstance(v, int) and v <= 0):
            raise ValueError(f"a snapshot is a positive step number or `final`, not {v!r}")
        return v


class TeacherEntry(Strict):
    """A domain's teacher with its options: `{stage: NAME, cross_tokenizer: true}` opts a teacher of another
    tokenizer (another model family) into cross-tokenizer scoring (docs/CROSS_TOKENIZER.md). Read into the stage's
    `teachers` (the name) and `cross_tokenizer` (the names that opted in), so the rest of mopd sees one form."""

    stage: str = Field(description="the teacher: a stage name or an HF directory")
    cross_tokenizer: bool = Field(
        False, description="the teacher has its own tokenizer: rollouts are re-rendered and re-tokenized for it, "
        "and its scores aligned to the student's tokens by character spans; without it a teacher whose tokenizer "
        "differs is refused",
    )


class PreflightSettings(Strict):
    """Checked once before a MOPD stage trains: same tokenizer (refused otherwise, unless the teacher opted into
    cross-tokenizer scoring: `TeacherEntry.cross_tokenizer`, which reports the alignment's coverage instead) and
    the initial per-token reverse KL(student || teacher) on the student's own rollouts of each teacher's domains
    (warned above `kl_warn`; the MOPD paper saw ~0.04 for a same-lineage teacher and ~0.19 for a foreign one that collapsed)."""

    enabled: bool = True
    kl_warn: float = Field(0.1, gt=0, description="warn when a teacher's initial reverse KL exceeds this")
    prompts: int = Field(32, gt=0, description="student rollouts per teacher for the KL measurement")
    min_teacher_gain: float | None = Field(
        None, description="refuse to train unless every teacher's held-out score on each of its domains beats the "
        "student start's by at least this (Nemotron 3 Ultra's round 2: teachers that beat the round-1 student); "
        "null: no check",
    )


DistillationObjective = Literal["sampled", "topk", "full_reverse_kl", "forward_kl", "jsd"]


class DistillationSettings(Strict):
    """What a MOPD step optimises: the distillation objective and the weight of the verifiable-reward term.

    The learner reads exactly this object (`learner.policy.policy_loss`); a stage without teachers has none.
    """

    alpha: float = Field(0.0, ge=0, description="weight of the verifiable-reward (GRPO) advantage")
    objective: DistillationObjective = Field(
        "sampled", description="sampled-token reverse KL (default) or a loss over teacher distributions"
    )
    topk: int = Field(16, gt=0, description="teacher support size for objective: topk")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="mixture weight for objective: jsd")
    surprise_alpha: float = Field(
        0.0, ge=0, description="objective: sampled; advantages times w_t = 1 + a * (1 - sg[pi_S(y_t)])"
    )


class MOPDStage(TrainStage, SamplingSettings, DistillationSettings):
    """Multi-teacher on-policy distillation: each rollout routed to its domain's teacher, per-token reverse KL.

    A = A_OPD + alpha * A_GRPO; alpha = 0 is pure distillation.
    """

    kind: Literal["mopd"]
    init: str
    teachers: dict[str, str | TeacherEntry] = Field(
        description="domain -> teacher (stage name or HF directory), or {stage: NAME, cross_tokenizer: true} for "
        "a teacher with its own tokenizer"
    )
    cross_tokenizer: list[str] = Field(
        default_factory=list, description="teachers (names as in `teachers`) scored across tokenizers; set by "
        "`cross_tokenizer: true` on a teacher, or listed here",
    )
    group_size: int = Field(1, gt=0, le=GROUP_MAX)
    preflight: PreflightSettings = Field(
        default_factory=lambda: PreflightSettings(), description="teacher-student compatibility check"
    )
    teacher_schedule: list[TeacherPhase] | None = Field(
        None, description="staged teachers: earlier snapshots first, then later ones; null = final teachers"
    )
    teacher_backends: dict[str, TeacherBackend] = Field(
        default_factory=dict, description="teacher -> where it scores (a Ray actor, an HTTP server); absent: in process"
    )
    teacher_shared_prefill: bool | Literal["auto"] = Field(
        "auto", description="in-process and actor teachers run each distinct prompt once and copy its KV cache to "
        "the group's rollouts that share it (the prompt's decoder pass once instead of group_size times); the same "
        "scores up to float rounding; auto: in-process teachers, when a step's groups share enough prompt tokens "
        "(`learner.sizing`)",
    )

    @model_validator(mode="after")
    def _teacher_names(self) -> MOPDStage:
        """Every `teachers` value as its name; the names that opted in go to `cross_tokenizer` (sorted, once)."""
        cross = set(self.cross_tokenizer)
        for domain, t in list(self.teachers.items()):
            if isinstance(t, TeacherEntry):
                self.teachers[domain] = t.stage
                if t.cross_tokenizer:
                    cross.add(t.stage)
        names = set(self.teachers.values())
        if unknown := sorted(cross - names):
            raise rule_error(self, "cross_tokenizer", message=f"{unknown[0]!r} is not one of this stage's teachers")
        self.cross_tokenizer = sorted(cross)
        return self

    @model_validator(mode="after")
    def _groups_for_grpo(self) -> MOPDStage:
        if self.alpha > 0 and self.group_size < 2:
            raise ValueError("alpha > 0 adds a GRPO advantage, which needs group_size >= 2")
        return self

    @model_validator(mode="after")
    def _schedule_in_order(self) -> MOPDStage:
        phases = self.teacher_schedule or []
        if self.teacher_schedule is not None and not phases:
            raise ValueError("`teacher_schedule` is empty; leave it out to use the final teachers")
        order = [float("inf") if p.snapshot == "final" else p.snapshot for p in phases]
        for a, b in zip(phases, phases[1:], strict=False):
            if b.until_step <= a.until_step:
                raise ValueError("`teacher_schedule` until_step values must increase")
        if order != sorted(order):
            raise ValueError("`teacher_schedule` must use earlier snapshots first, then later ones")
        if phases and phases[-1].until_step != self.steps:
            raise ValueError(
                f"`teacher_schedule` must end at until_step = steps ({self.steps}), not {phases[-1].until_step}"
            )
        return self

    @model_validator(mode="after")
    def _objective_fits(self) -> MOPDStage:
        """Surprise reweighting and the teachers' backends each work with some objectives only."""
        if self.surprise_alpha > 0 and self.objective != "sampled":
            raise rule_error(self, "surprise_alpha", message="surprise reweighting scales sampled-token advantages; "
                             f"it needs `objective: sampled` (got {self.objective!r})")
        if why := backend_problem(self):
            raise rule_error(self, "teacher_backends", message=why)
        return self
