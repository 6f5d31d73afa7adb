"""What a stage needs to run, resolved by the runner before any compute."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..recipe.schema import Recipe


@dataclass
class StageContext:
    name: str
    settings: Any  # one of the stage models in recipe.schema
    recipe: Recipe
    stage_dir: Path
    identity: str
    seed: int
    tokenizer: Any
    init_path: str | None  # finished checkpoint or HF directory / id the stage starts from
    model_refs: dict[str, str] = field(default_factory=dict)  # stage name / reference -> checkpoint path
    parents: dict[str, str] = field(default_factory=dict)  # parent name -> its identity
    on_progress: Callable[[int, int, dict[str, float]], None] | None = None  # (step, total, metrics)
    on_warning: Callable[[str], None] | None = None  # one-line warnings for the console (default: logging)

    @property
    def domains(self) -> list[str]:
        return list(getattr(self.settings, "domains", None) or self.recipe.domains)
