"""The `auto` step settings of a sampling stage, chosen once at its first step (`learner.sizing`), printed in one
line and kept in stage.json beside the identity, so a run directory says what its steps ran with.

Why at the first step and not at load: the choice needs the loaded models (vocabulary, widths, depth, what is
trained) and a real batch (its rows and prompt columns), and the memory left once the models are in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..core.batch import RolloutBatch
from ..core.run_dir import STAGE_JSON
from ..core.schema import MOPDStage
from ..core.scoring import TeacherScorer
from ..learner.sizing import ModelShape, Sizing, StepShape, available_bytes, choose_sizing
from ..models.checkpoint import write_json_atomic
from ..teachers.panel import TeacherPanel
from .resolved import ResolvedStage


def local_teachers(panel: TeacherScorer | None) -> TeacherPanel | None:
    """The in-process teachers of a panel (a mixed panel's local part), or None."""
    local = getattr(panel, "local", panel)
    return local if isinstance(local, TeacherPanel) else None


def _resident_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def budget_bytes(ctx: ResolvedStage) -> int:
    """`memory_budget_gib`, or half of what this process may use: what is free plus what it already holds."""
    s = ctx.settings
    if s.memory_budget_gib is not None:
        return int(s.memory_budget_gib * 2**30)
    device = ctx.placement.device
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else _resident_bytes()
    return (available_bytes(device) + held) // 2


def stage_sizing(ctx: ResolvedStage, model: torch.nn.Module, batch: RolloutBatch, panel: TeacherScorer | None) -> Sizing:
    """Choose the step's settings from the first batch; the lead prints them and records them in stage.json."""
    s = ctx.settings
    local = local_teachers(panel)
    objective = s.objective if isinstance(s, MOPDStage) else "grpo"
    step = StepShape(rows=batch.size, prompt_columns=batch.first_completion_column,
                     max_new_tokens=s.max_new_tokens, group_size=s.group_size)
    remote_only = panel is not None and local is None
    sizing = choose_sizing(s, objective, ModelShape.of(model),
                           [ModelShape.of(m) for m in local.models.values()] if local else [], step,
                           ctx.placement.device.type, budget_bytes(ctx), local_teachers=not remote_only)
    if ctx.learner.lead:
        ctx.hooks.note(f"step settings: {sizing.line()}")
        path = ctx.stage_dir / STAGE_JSON
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError):
            marker = None
        if isinstance(marker, dict):
            write_json_atomic(path, {**marker, "sizing": sizing.record()})
    return sizing


def apply_to_panel(panel: TeacherScorer | None, sizing: Sizing) -> None:
    """The in-process teachers score with the step's blocks and shared prefill, and so do served teachers that
    run the in-process computation on their side (`mopd serve`'s exact endpoint: `teachers.http`) and in-process
    teachers of another tokenizer."""
    # and a teacher of another tokenizer in this process (`teachers.cross_tokenizer.PanelTeacher`): its own panel
    own = [getattr(getattr(t, "inner", None), "panel", None) for t in getattr(panel, "remote", {}).values()]
    for local in [local_teachers(panel), *own]:
        if isinstance(local, TeacherPanel):
            local.logit_chunk, local.vocab_block, local.share_prefill = (sizing.logit_chunk, sizing.vocab_block,
                                                                        sizing.shared_prefill)
    for teacher in getattr(panel, "remote", {}).values():
        settings = getattr(getattr(teacher, "inner", teacher), "step_settings", None)
        if isinstance(settings, dict):
            settings.update(logit_chunk=sizing.logit_chunk, vocab_block=sizing.vocab_block,
                            share_prefill=sizing.shared_prefill)
