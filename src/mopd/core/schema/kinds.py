"""Every stage kind of a recipe, as one discriminated union (by `kind`), and the groups code dispatches on."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .mopd import MOPDStage
from .ppo import PPOStage
from .preference import DPOStage, RejectionSamplingStage, RewardModelStage
from .prompted import ModelStage, PromptedStage
from .stages import (
    CascadeRLStage,
    EvalStage,
    MergeStage,
    MixRLStage,
    OffPolicyFTStage,
    PretrainStage,
    RLVRStage,
    SFTStage,
)

Stage = Annotated[
    PretrainStage | SFTStage | RLVRStage | MixRLStage | CascadeRLStage | OffPolicyFTStage | MergeStage | MOPDStage
    | DPOStage | RejectionSamplingStage | RewardModelStage | PPOStage | EvalStage | PromptedStage | ModelStage,
    Field(discriminator="kind"),
]
KINDS = (
    "pretrain", "sft", "rlvr", "mix_rl", "cascade_rl", "offpolicy_ft", "merge", "mopd", "dpo", "rejection_sampling",
    "reward_model", "ppo", "eval", "prompted", "model",
)
SamplingStage = RLVRStage | MixRLStage | CascadeRLStage | MOPDStage  # the stages that train on their own rollouts
TrainedStage = (
    PretrainStage | SFTStage | RLVRStage | MixRLStage | CascadeRLStage | OffPolicyFTStage | MOPDStage | DPOStage
    | RejectionSamplingStage | RewardModelStage | PPOStage
)
