"""The `prompted` stage: a teacher that is a model plus a system prompt and worked examples, no training; and the
`model` stage: a model from outside the recipe as it is, evaluated once.

Why a stage: a prompted teacher then has what every teacher has (a checkpoint directory, held-out scores with its
prompt, a lineage, a place in the report and in stage identities), so MOPD routes to it like to a trained one,
and a recipe can mix both kinds in one panel (context distillation beside RL teachers).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .bounds import Seed
from .stages import DeviceName, DType, StageResources
from .strict import Strict


class PromptExample(Strict):
    """One worked example: a user turn and the assistant's answer."""

    prompt: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class PromptedStage(Strict):
    kind: Literal["prompted"]
    init: str = Field(description="the model that reads the prompt: a stage of this recipe or a model directory")
    system: str | None = Field(None, description="the system prompt put before every prompt")
    examples: list[PromptExample] = Field(
        default_factory=list, description="worked examples, rendered as earlier user / assistant turns")
    domains: list[str] | None = Field(None, description="the domains it is meant to teach (informational)")
    seed: Seed | None = Field(None, description="defaults to the recipe seed")
    dtype: DType | None = Field(None, description="defaults to the recipe's `dtype`")
    device: DeviceName | None = Field(None, description="defaults to the recipe's `device`")
    resources: StageResources = Field(default_factory=StageResources,
                                      description="`--executor ray`: CPUs / GPUs this stage reserves")

    @model_validator(mode="after")
    def _says_something(self) -> PromptedStage:
        if not (self.system and self.system.strip()) and not self.examples:
            raise ValueError("a prompted stage needs a `system` prompt or `examples` (else it is its `init`)")
        return self


class ModelStage(Strict):
    """A released model (a Hub id, a directory, a `gguf:` file) as a stage of the recipe: its checkpoint and its
    held-out scores, so the report's `start` column and `init:` references treat it like a trained stage."""

    kind: Literal["model"]
    init: str = Field(description="the model: a Hugging Face directory or id, or gguf:PATH")
    seed: Seed | None = Field(None, description="defaults to the recipe seed")
    dtype: DType | None = Field(None, description="defaults to the recipe's `dtype`")
    device: DeviceName | None = Field(None, description="defaults to the recipe's `device`")
    resources: StageResources = Field(default_factory=StageResources,
                                      description="`--executor ray`: CPUs / GPUs this stage reserves")
