"""The recipe format: every setting, its type and its default, in one place (see `stages.py`, `recipe.py`)."""

from .recipe import (
    CompareSettings,
    DataDomainSpec,
    DataFields,
    DomainEntry,
    EvalSettings,
    Recipe,
    ReportSettings,
    TokenizerSettings,
)
from .stages import (
    KINDS,
    NAME_PATTERN,
    CascadeRLStage,
    DeviceName,
    DistillationObjective,
    DistillationSettings,
    DType,
    EvalStage,
    LoraSettings,
    MasterWeights,
    MergeStage,
    MixRLStage,
    MOPDStage,
    OffPolicyFTStage,
    PreflightSettings,
    PretrainStage,
    RLVRStage,
    SamplingSettings,
    SamplingStage,
    SFTStage,
    Stage,
    Strict,
    TeacherPhase,
    TinyModelConfig,
    TrainedStage,
    TrainStage,
)

__all__ = [
    "KINDS", "NAME_PATTERN", "CascadeRLStage", "CompareSettings", "DataDomainSpec", "DataFields", "DeviceName",
    "DistillationObjective", "DistillationSettings", "DType", "DomainEntry", "EvalSettings", "EvalStage",
    "LoraSettings", "MasterWeights", "MergeStage", "MixRLStage", "MOPDStage", "OffPolicyFTStage",
    "PreflightSettings", "PretrainStage", "RLVRStage", "Recipe", "ReportSettings", "SamplingSettings",
    "SamplingStage", "SFTStage", "Stage", "Strict", "TeacherPhase", "TinyModelConfig", "TokenizerSettings",
    "TrainStage", "TrainedStage",
]
