"""The recipe format: every setting, its type and its default (`stages.py`, `mopd.py`, `ppo.py`, `preference.py`,
`prompted.py`, `kinds.py`, `recipe.py`; defaults code below the recipe shares: `defaults.py`)."""

from .kinds import KINDS, SamplingStage, Stage, TrainedStage
from .mopd import (
    DistillationObjective,
    DistillationSettings,
    MOPDStage,
    PreflightSettings,
    TeacherEntry,
    TeacherPhase,
)
from .ppo import PPOStage
from .preference import DatasetPairs, DeltaPairs, DPOStage, RejectionSamplingStage, RewardModelStage
from .prompted import ModelStage, PromptedStage, PromptExample
from .recipe import (
    CompareSettings,
    DataDomainSpec,
    DataFields,
    DomainEntry,
    EvalSettings,
    ExecutorName,
    LoggingSettings,
    MlflowSettings,
    Recipe,
    ReportSettings,
    TrackioSettings,
    VerifiersDomainSpec,
    WandbSettings,
)
from .rewards import (
    DEFAULT_REWARD,
    JudgeReward,
    OneRewardSource,
    PerDomainReward,
    RewardModelReward,
    RewardSource,
    reward_of,
    reward_parts,
    source_of,
)
from .stages import (
    NAME_PATTERN,
    CascadeRLStage,
    DeviceName,
    DType,
    EvalStage,
    LoraSettings,
    MasterWeights,
    MergeStage,
    MixRLStage,
    OffPolicyFTStage,
    PretrainStage,
    RLVRStage,
    SamplingSettings,
    SFTStage,
    StageResources,
    Strict,
    TinyModelConfig,
    TokenizerSettings,
    TrainStage,
    fixed_logit_chunk,
    fixed_micro_batch,
)
from .teachers import ActorBackend, HttpBackend, TeacherBackend, TeacherResources
from .workers import LearnerWorkers, RolloutWorkers

__all__ = [
    "fixed_logit_chunk",
    "fixed_micro_batch",
    "KINDS", "NAME_PATTERN", "CascadeRLStage", "CompareSettings", "DataDomainSpec", "DataFields", "DeltaPairs",
    "DeviceName", "DPOStage",
    "DistillationObjective", "DistillationSettings", "DType", "DomainEntry", "EvalSettings", "EvalStage", "ExecutorName",
    "LoggingSettings", "LoraSettings", "MasterWeights", "MlflowSettings", "MergeStage", "ModelStage", "PromptedStage", "PromptExample", "MixRLStage", "MOPDStage",
    "OffPolicyFTStage",
    "PreflightSettings", "PretrainStage", "RejectionSamplingStage", "RLVRStage", "Recipe", "ReportSettings", "SamplingSettings",
    "SamplingStage", "SFTStage", "Stage", "StageResources", "Strict", "TeacherEntry", "TeacherPhase", "TinyModelConfig", "TokenizerSettings",
    "TrackioSettings", "TrainStage", "TrainedStage", "VerifiersDomainSpec", "WandbSettings",
    "DatasetPairs", "JudgeReward", "OneRewardSource", "PerDomainReward", "PPOStage", "RewardModelReward",
    "RewardModelStage", "RewardSource", "DEFAULT_REWARD", "reward_of", "reward_parts", "source_of",
    "ActorBackend", "HttpBackend", "TeacherBackend", "TeacherResources",
    "LearnerWorkers", "RolloutWorkers",
]
