"""Preference-style stage kinds: DPO on pairs built each step, rejection-sampling SFT, and the Bradley-Terry
reward model.

Kept apart from `stages.py` (the distillation recipe's kinds) so that each schema module stays small; the union of
every kind is in `kinds.py`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from .bounds import GROUP_MAX, NEW_TOKENS_MAX
from .rewards import DEFAULT_REWARD, REWARD_DESCRIPTION, RewardSource
from .stages import Strict, TrainStage


class DeltaPairs(Strict):
    """OLMo 3's delta learning: for each prompt the `strong` model's sampled answer is chosen over the `weak`
    model's (stage names or HF directories); the pair's quality comes from the gap between the two models."""

    strong: str = Field(description="the model whose answer is chosen (stage name or HF directory)")
    weak: str = Field(description="the model whose answer is rejected (stage name or HF directory)")


class DatasetPairs(Strict):
    """Preference pairs from a JSONL file, one {"prompt", "chosen", "rejected"} object a line (an optional
    "domain" names the row's domain); the path is relative to the recipe. Every 10th pair is held out for the
    stage's pair accuracy; the others are drawn `batch_size` at a time from (seed, step)."""

    dataset: str = Field(description="a JSONL file of {prompt, chosen, rejected}")


PairsFrom = Literal["policy"] | DeltaPairs | DatasetPairs
PAIRS_DESCRIPTION = "`policy` (ranked samples), {strong: STAGE, weak: STAGE} or {dataset: PATH}"


class DPOStage(TrainStage):
    """Direct preference optimisation against a frozen reference, on pairs built afresh every step.

    pairs_from: policy  `group_size` samples of the current policy per prompt, scored by the domain verifier:
                        chosen = best, rejected = worst; prompts whose best and worst rewards tie are skipped.
    pairs_from: {strong, weak}  one sample of each model per prompt (OLMo 3's delta pairs); equal answers skipped.
    pairs_from: {dataset}       pairs from a JSONL file (`DatasetPairs`).
    `reward` ranks the policy's samples: the verifier, a reward model or a judge.
    Losses over the sequence log-ratio margin m = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)):
    sigmoid -log sigmoid(beta m) (DPO), ipo (m - 1/(2 beta))^2; `length_normalized` uses per-token means.
    """

    kind: Literal["dpo"]
    init: str
    reference: str | None = Field(None, description="the frozen reference (stage name or HF directory); default: init")
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL to the reference")
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    length_normalized: bool = Field(False, description="per-token mean logprobs instead of sums")
    pairs_from: PairsFrom = Field("policy", description=PAIRS_DESCRIPTION)
    reward: RewardSource = Field(DEFAULT_REWARD, description="ranks pairs_from: policy; " + REWARD_DESCRIPTION)
    group_size: int = Field(4, gt=0, le=GROUP_MAX, description="policy samples per prompt (pairs_from: policy)")
    max_new_tokens: int = Field(12, gt=0, le=NEW_TOKENS_MAX)
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
    prompt, `reward` (the domain verifier by default) scores them, the best is kept when its reward >= `threshold`, and the stage takes
    the SFT step on the kept (prompt, answer) pairs. Rounds are successive stages (`sampler:` a previous round)."""

    kind: Literal["rejection_sampling"]
    init: str
    sampler: str | None = Field(None, description="the model sampled from (stage name or HF directory); default: init")
    n: int = Field(8, gt=0, le=GROUP_MAX, description="answers sampled per prompt (best-of-n)")
    threshold: float = Field(1.0, ge=0, le=1, description="keep a prompt's best answer when its reward >= this")
    domain_thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] | None = Field(
        None, description="per-domain thresholds replacing `threshold` for the listed domains (a judged domain's "
        "scores are probabilities that never reach 1.0)",
    )
    reward: RewardSource = Field(DEFAULT_REWARD, description="scores the answers; " + REWARD_DESCRIPTION)
    max_new_tokens: int = Field(12, gt=0, le=NEW_TOKENS_MAX)
    temperature: float = Field(1.0, gt=0, description="sampler temperature")
    top_p: float = Field(1.0, gt=0, le=1)


class RewardModelStage(TrainStage):
    """A Bradley-Terry reward model (InstructGPT): a scalar head on `init`'s backbone, trained on preference pairs
    with loss -log sigmoid(r(chosen) - r(rejected)); saved as an HF sequence-classification checkpoint
    (`AutoModelForSequenceClassification` opens it). Its metrics carry the pair accuracy of held-out pairs.

    pairs_from: policy  `group_size` samples of the frozen `init` per prompt ranked by `reward`: best over worst.
    pairs_from: {strong, weak} / {dataset}  as in `dpo`.
    """

    kind: Literal["reward_model"]
    init: str
    pairs_from: PairsFrom = Field("policy", description=PAIRS_DESCRIPTION)
    reward: RewardSource = Field(DEFAULT_REWARD, description="ranks pairs_from: policy; " + REWARD_DESCRIPTION)
    group_size: int = Field(4, gt=0, le=GROUP_MAX, description="samples per prompt (pairs_from: policy)")
    max_new_tokens: int = Field(12, gt=0, le=NEW_TOKENS_MAX)
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the pair's answers")
    top_p: float = Field(1.0, gt=0, le=1)
    eval_pairs: int = Field(32, gt=0, description="held-out prompts (policy / delta pairs) for the pair accuracy")

    @model_validator(mode="after")
    def _whole_model(self) -> RewardModelStage:
        if self.lora is not None:
            raise ValueError("a reward_model stage trains its new score head with the backbone: leave `lora` out")
        return self

    @field_validator("group_size")
    @classmethod
    def _pairs_need_two(cls, v: int, info) -> int:
        if info.data.get("pairs_from") == "policy" and v < 2:
            raise ValueError(f"pairs_from: policy ranks samples of a prompt into a pair: group_size >= 2 (got {v})")
        return v
