"""Preference-style stage kinds: DPO on pairs built each step, and rejection-sampling SFT.

Kept apart from `stages.py` (the distillation recipe's kinds) so that each schema module stays small; the union of
every kind is in `kinds.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .stages import Strict, TrainStage


class DeltaPairs(Strict):
    """OLMo 3's delta learning: for each prompt the `strong` model's sampled answer is chosen over the `weak`
    model's (stage names or HF directories); the pair's quality comes from the gap between the two models."""

    strong: str = Field(description="the model whose answer is chosen (stage name or HF directory)")
    weak: str = Field(description="the model whose answer is rejected (stage name or HF directory)")


class DPOStage(TrainStage):
    """Direct preference optimisation against a frozen reference, on pairs built afresh every step.

    pairs_from: policy  `group_size` samples of the current policy per prompt, scored by the domain verifier:
                        chosen = best, rejected = worst; prompts whose best and worst rewards tie are skipped.
    pairs_from: {strong, weak}  one sample of each model per prompt (OLMo 3's delta pairs); equal answers skipped.
    Losses over the sequence log-ratio margin m = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)):
    sigmoid -log sigmoid(beta m) (DPO), ipo (m - 1/(2 beta))^2; `length_normalized` uses per-token means.
    """

    kind: Literal["dpo"]
    init: str
    reference: str | None = Field(None, description="the frozen reference (stage name or HF directory); default: init")
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL to the reference")
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    length_normalized: bool = Field(False, description="per-token mean logprobs instead of sums")
    pairs_from: Literal["policy"] | DeltaPairs = Field(
        "policy", description="`policy` (ranked samples of the policy) or {strong: STAGE, weak: STAGE}"
    )
    group_size: int = Field(4, gt=0, description="policy samples per prompt (pairs_from: policy)")
    max_new_tokens: int = Field(12, gt=0)
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the pair's answers")
    top_p: float = Field(1.0, gt=0, le=1)

    @field_validator("group_size")
    @classmethod
    def _pairs_need_two(cls, v: int, info) -> int:
        if info.data.get("pairs_from") == "policy" and v < 2:
            raise ValueError(f"pairs_from: policy ranks samples of a prompt into a pair: group_size >= 2 (got {v})")
        return v


class RejectionSamplingStage(TrainStage):
    """Rejection-sampling SFT (Llama 2, DeepSeek R1): each step a frozen `sampler` model draws `n` answers per
    prompt, the domain verifier scores them, the best is kept when its reward >= `threshold`, and the stage takes
    the SFT step on the kept (prompt, answer) pairs. Rounds are successive stages (`sampler:` a previous round)."""

    kind: Literal["rejection_sampling"]
    init: str
    sampler: str | None = Field(None, description="the model sampled from (stage name or HF directory); default: init")
    n: int = Field(8, gt=0, description="answers sampled per prompt (best-of-n)")
    threshold: float = Field(1.0, ge=0, le=1, description="keep a prompt's best answer when its reward >= this")
    max_new_tokens: int = Field(12, gt=0)
    temperature: float = Field(1.0, gt=0, description="sampler temperature")
    top_p: float = Field(1.0, gt=0, le=1)
