"""The recipe schema: every setting and its default is visible here.

pydantic with `extra="forbid"` everywhere, so a misspelt key is an error at load time, never a silent default.
Stage kinds form a discriminated union on `kind`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..models.tiny import TinyModelConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizerSettings(Strict):
    """Character tokenizer for tiny models built from scratch; `alphabet: null` means the domains' alphabet."""

    alphabet: str | None = None


class EvalSettings(Strict):
    """Every trained stage is scored on each domain's fixed held-out set with greedy decoding."""

    size: int = Field(96, gt=0, description="held-out prompts per domain")
    seed: int = 1234
    max_new_tokens: int = Field(12, gt=0)
    batch_size: int = Field(256, gt=0)


class TrainStage(Strict):
    init: str | None = Field(None, description="a stage name of this recipe, or a Hugging Face directory / id")
    seed: int | None = Field(None, description="defaults to the recipe seed")
    steps: int = Field(gt=0)
    batch_size: int = Field(32, gt=0, description="prompts per step")
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    domains: list[str] | None = Field(None, description="defaults to every recipe domain")
    difficulties: list[int] | None = Field(None, description="difficulty levels to train on; default all")
    checkpoint_every: int = Field(100, gt=0, description="steps between resumable checkpoints")
    eval_every: int = Field(0, ge=0, description="steps between held-out evals logged as curves; 0 = end only")


class PretrainStage(TrainStage):
    """Next-token prediction on every token of a synthetic corpus (prompt and answer): a tiny base model."""

    kind: Literal["pretrain"]
    model: TinyModelConfig | None = Field(None, description="shape of a model built from scratch (when no init)")

    @model_validator(mode="after")
    def _model_or_init(self) -> PretrainStage:
        if (self.model is None) == (self.init is None):
            raise ValueError("a pretrain stage needs exactly one of `model` (build from scratch) or `init`")
        return self


class SFTStage(TrainStage):
    """Token NLL on the reference answers only (the prompt is context, not a target)."""

    kind: Literal["sft"]
    init: str


class SamplingSettings(Strict):
    group_size: int = Field(8, gt=0, description="completions sampled per prompt")
    max_new_tokens: int = Field(12, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    is_mode: Literal["truncate", "clip", "none"] = "truncate"
    eps_low: float = Field(0.5, gt=0, description="tokens with pi_theta/pi_sampler below this are dropped")
    eps_high: float = Field(2.0, gt=1, description="... and above this")
    adv_clip: float | None = Field(5.0, gt=0, description="|A| <= adv_clip")


class RLVRStage(TrainStage, SamplingSettings):
    """GRPO with verifiable rewards: group-normalized reward as the advantage of every completion token."""

    kind: Literal["rlvr"]
    init: str


class MOPDStage(TrainStage, SamplingSettings):
    """Multi-teacher on-policy distillation: each rollout routed to its domain's teacher, per-token reverse KL.

    A = A_OPD + alpha * A_GRPO; alpha = 0 is pure distillation.
    """

    kind: Literal["mopd"]
    init: str
    teachers: dict[str, str] = Field(description="domain -> teacher (stage name or HF directory)")
    alpha: float = Field(0.0, ge=0, description="weight of the verifiable-reward (GRPO) advantage")
    group_size: int = Field(1, gt=0)
    objective: Literal["sampled", "topk", "full_reverse_kl", "forward_kl", "jsd"] = Field(
        "sampled", description="sampled-token reverse KL (default) or a loss over teacher distributions"
    )
    topk: int = Field(16, gt=0, description="teacher support size for objective: topk")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="mixture weight for objective: jsd")

    @model_validator(mode="after")
    def _groups_for_grpo(self) -> MOPDStage:
        if self.alpha > 0 and self.group_size < 2:
            raise ValueError("alpha > 0 adds a GRPO advantage, which needs group_size >= 2")
        return self


class EvalStage(Strict):
    """Score checkpoints (stages or HF directories) on the held-out sets; results land in eval.json."""

    kind: Literal["eval"]
    models: list[str] = Field(min_length=1)
    domains: list[str] | None = None


Stage = Annotated[PretrainStage | SFTStage | RLVRStage | MOPDStage | EvalStage, Field(discriminator="kind")]
KINDS = ("pretrain", "sft", "rlvr", "mopd", "eval")


class ReportSettings(Strict):
    student: str | None = Field(None, description="the MOPD stage the summary scores; default: the last one")


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    plugins: list[str] = Field(default_factory=list, description="Python files that register domains")
    domains: list[str] = Field(min_length=1)
    tokenizer: TokenizerSettings = TokenizerSettings()
    eval: EvalSettings = EvalSettings()
    stages: dict[str, Stage] = Field(min_length=1)
    report: ReportSettings = ReportSettings()
