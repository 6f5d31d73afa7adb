"""What every checkpoint says about where it came from (`mopd.json`): stage, identity, parents, teachers, seed.

A round-2 student's lineage names each teacher's stage, identity and checkpoint (and, with a teacher schedule,
each phase's snapshot), so a run directory answers "which teacher version fed this model" on its own.
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..core.run_dir import METRICS, SNAPSHOTS
from ..core.schema import MOPDStage
from ..models.integrity import METRICS_KEY, file_record
from .resolved import ResolvedStage


def snapshot_path(stage_dir: Path, step: int) -> Path:
    """Where `keep_every` puts the HF snapshot of a stage at `step` (kept after the stage finishes)."""
    return Path(stage_dir) / SNAPSHOTS / f"step-{step:07d}"


def teacher_checkpoint(final_ref: str, snapshot: int | str) -> str:
    """The checkpoint of a teacher at a scheduled snapshot: its final directory, or a kept step beside it."""
    if snapshot == "final":
        return final_ref
    return str(snapshot_path(Path(final_ref).parent, int(snapshot)))


def teacher_lineage(ctx: ResolvedStage) -> dict[str, dict] | None:
    """Per domain: the teacher's stage name, identity and checkpoint; with a teacher_schedule, each phase's."""
    if not ctx.teacher_of_domain:
        return None
    schedule = ctx.settings.teacher_schedule if isinstance(ctx.settings, MOPDStage) else None
    out = {}
    for domain, name in ctx.teacher_of_domain.items():
        t = ctx.teachers[name]
        out[domain] = {"stage": name, "identity": t.identity, "checkpoint": t.checkpoint}
        if schedule:
            out[domain]["schedule"] = [
                {"until_step": ph.until_step, "snapshot": ph.snapshot, "checkpoint": checkpoint}
                for ph, checkpoint in zip(schedule, t.phases, strict=True)
            ]
    return out


def lineage(ctx: ResolvedStage, step: int, metrics: dict) -> dict:
    s = ctx.settings
    return {
        "stage": ctx.name,
        "kind": s.kind,
        "identity": ctx.identity,
        "parents": ctx.parents,
        "init": ctx.init_path,
        "init_stage": ctx.init_ref,
        "teachers": teacher_lineage(ctx),
        "seed": ctx.seed,
        "step": step,
        "version": __version__,
        "settings": s.model_dump(mode="json"),
        "metrics": metrics,
    }


def final_lineage(ctx: ResolvedStage, step: int, metrics: dict) -> dict:
    """The lineage of a stage's final output, with the size and sha256 of its (now complete) metrics log, so
    that a damaged log is found like a damaged checkpoint (`models.integrity.stage_output_problem`)."""
    return {**lineage(ctx, step, metrics), METRICS_KEY: file_record(ctx.stage_dir / METRICS)}
