"""The `ppo` stage kind: PPO with a value model (critic) and GAE, and a KL penalty to a frozen reference."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .bounds import GROUP_MAX
from .stages import SamplingSettings, TrainStage

# SamplingSettings fields of the GRPO step that PPO has no use for: setting one is refused, not ignored
NOT_PPO = {"is_mode", "eps_low", "eps_high", "adv_clip", "filter_solved", "rollout", "learner"}


class PPOStage(TrainStage, SamplingSettings):
    """PPO (InstructGPT, Llama 2) on the policy's own rollouts, rewarded by `reward` (a verifier, a reward model or
    a judge) at the last completion token, with a per-token KL penalty to a frozen `reference`:

        r_t = -kl_coef * (log pi_old(y_t) - log ref(y_t))  (+ the reward at the last token)
        A = GAE(gamma, lam) of r_t over the critic's values V_t; returns R_t = A_t + V_t
        policy: -min(rho A, clip(rho, 1 - clip, 1 + clip) A), rho = pi / pi_old
        critic: vf_coef * 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -value_clip, value_clip) - R)^2)

    `epochs` passes over each step's rollouts (one update per pass). The critic is a causal LM with a scalar
    value head; its checkpoint is saved in <stage>/critic beside the policy's final/.
    """

    kind: Literal["ppo"]
    init: str
    reference: str | None = Field(None, description="the frozen KL reference (stage name or HF directory); default: init")
    critic: str | None = Field(
        None, description="the value model's starting weights (a stage, e.g. a reward_model, or HF directory); "
        "default: init",
    )
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty to the reference, in the reward")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip: float = Field(0.2, gt=0, lt=1, description="policy ratio clip")
    value_clip: float | None = Field(0.2, gt=0, description="value clip around the rollout's values; null: none")
    vf_coef: float = Field(0.5, ge=0, description="weight of the value loss")
    epochs: int = Field(1, gt=0, description="updates per step's rollouts")
    group_size: int = Field(4, gt=0, le=GROUP_MAX, description="completions sampled per prompt")

    @model_validator(mode="after")
    def _whole_rollouts(self) -> PPOStage:
        unused = sorted(self.model_fields_set & NOT_PPO)
        if unused:
            raise ValueError(f"`{unused[0]}` is a GRPO setting that ppo does not use (PPO clips with `clip`, "
                             "samples and updates in the stage's own process)")
        if self.checkpoint_every % self.epochs:
            raise ValueError(f"`checkpoint_every` ({self.checkpoint_every}) must be a multiple of `epochs` "
                             f"({self.epochs}): a resumed stage starts at a fresh rollout")
        return self
