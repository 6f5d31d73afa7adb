"""The recipe schema of the stage kinds: every setting and its default is visible here (the mopd, ppo and
preference kinds in their own modules; a default the code below the recipe shares, by name from `defaults.py`),
and only here.

pydantic with `extra="forbid"` everywhere, so a misspelt key is an error at load time, never a silent default.
Stage kinds form a discriminated union on `kind`. Every layer reads these types (they sit in the bottom layer),
so a stage's settings keep one form from the YAML file down to the learner.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .bounds import BATCH_MAX, GROUP_MAX, LR_MAX, NEW_TOKENS_MAX, VOCAB_MAX, Seed, Steps
from .defaults import ADV_CLIP, EPS_HIGH, EPS_LOW, IS_MODE, ISMode
from .rewards import DEFAULT_REWARD, REWARD_DESCRIPTION, RewardSource
from .strict import Strict, rule_error
from .workers import LearnerWorkers, RolloutWorkers, scale_problem

# Positions per block of logits where `logit_chunk: auto` is not chosen from the shapes (the stages that do not
# sample: sft, dpo, ppo, ...): at least the <= 64 positions of the tiny recipes' rows, so those run in one block.
DEFAULT_LOGIT_CHUNK = 128

# `auto`: chosen at the start of the stage from the model shapes, the batch and `memory_budget_gib`
# (`learner.sizing`), printed and stored in stage.json; a number (or null) set in the recipe wins.
Auto = Literal["auto"]
PositiveInt = Annotated[int, Field(gt=0)]

# Tokens of a BPE tokenizer built from scratch unless a recipe says otherwise: the character vocabulary's 47 and 17
# merges. Why so few: a model must learn what each merged token spells, and on the demo's testbed the teachers of a
# 256-token BPE reached held-out scores of 0.08-0.17 where the character ones reach 0.87-1.00; 64 tokens (with
# longer pretraining) matched them (docs/CROSS_TOKENIZER.md).
BPE_VOCAB_SIZE = 64

# A stage name is a directory of the run: letters, digits, '_', '-' and '.', not starting with '.' or '-' (so
# never '', '.', '..', a path, or a hidden or option-like name).
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


class TinyModelConfig(Strict):
    """Shape of a tiny model built from scratch. Every default is visible here; a recipe's `model:` block
    overrides them."""

    arch: Literal["qwen3", "llama"] = "qwen3"
    hidden_size: int = Field(128, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(384, gt=0)
    max_positions: int = Field(64, gt=0)
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _shape_builds(self) -> TinyModelConfig:
        """A shape that cannot be built is a recipe error at load, not a crash when the stage starts."""
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden_size must divide by heads, and heads by kv_heads")
        if (self.hidden_size // self.heads) % 2:
            raise ValueError("hidden_size / heads (the head size) must be even: rotary embeddings rotate pairs")
        return self


class TokenizerSettings(Strict):
    """The tokenizer of a tiny model built from scratch: one token per character (`char`), or a byte-level BPE
    (`bpe`) trained on a fixed-seed corpus of the recipe's domains (`recipe.tokenizer`), e.g. for teachers whose
    tokens differ from a character student's (docs/CROSS_TOKENIZER.md)."""

    kind: Literal["char", "bpe"] = Field("char", description="char: one token per character; bpe: byte-level BPE")
    alphabet: str | None = Field(
        None, description="the characters (bpe: those its vocabulary starts from); `printable` = Python's "
        "string.printable (covers the bundled data sets); null: the domains' alphabet",
    )
    vocab_size: int = Field(
        BPE_VOCAB_SIZE, gt=0, le=VOCAB_MAX, description="bpe only: the most tokens in all (the four special tokens, "
        "the alphabet's bytes, then merges learned from the corpus)",
    )

    @model_validator(mode="after")
    def _vocab_size_for_bpe(self) -> TokenizerSettings:
        if self.kind == "char" and "vocab_size" in self.model_fields_set:
            raise rule_error(self, "vocab_size", message="only a `kind: bpe` tokenizer learns a vocabulary; a "
                             "character tokenizer has one token per character of `alphabet`")
        return self


DType = Literal["auto", "float32", "bfloat16"]  # auto: bfloat16 on a CUDA device that supports it, else float32
DeviceName = Literal["auto", "cpu", "cuda"]  # auto: cuda when available, else cpu
# float32: trained weights and optimizer state in float32, compute in `dtype` under autocast (mixed precision);
# same: weights kept in `dtype` too (half the memory, but AdamW updates below bfloat16's resolution vanish)
MasterWeights = Literal["float32", "same"]


class LoraSettings(Strict):
    """LoRA adapters via peft (`pip install mopd[lora]`). The saved checkpoint is the merged plain HF model."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names to adapt, or `all-linear`",
    )


class StageResources(Strict):
    """What one stage asks of the executor: `mopd run --executor ray` schedules it on a worker with these free;
    the local executor runs stages one at a time in its own process, and refuses GPUs this machine does not have.
    Not part of a stage's identity."""

    cpus: float = Field(1.0, gt=0, description="CPU cores the stage's worker reserves (its torch threads by default)")
    gpus: float = Field(0.0, ge=0, description="GPUs the stage's worker reserves (fractions share one device)")


class TrainStage(Strict):
    init: str | None = Field(None, description="a stage name of this recipe, or a Hugging Face directory / id")
    seed: Seed | None = Field(None, description="defaults to the recipe seed")
    steps: Steps
    batch_size: int = Field(32, gt=0, le=BATCH_MAX, description="prompts per step")
    lr: float = Field(1e-3, gt=0, le=LR_MAX)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a step whose loss or gradient is NaN/inf: stop the stage in one line naming stage, step "
        "and metric (nothing non-finite is saved), or skip its update and count it (`nonfinite/skipped`)",
    )
    domains: list[str] | None = Field(None, description="defaults to every recipe domain")
    difficulties: list[int] | None = Field(None, description="difficulty levels to train on; default all")
    checkpoint_every: int = Field(100, gt=0, description="steps between resumable checkpoints")
    eval_every: int = Field(0, ge=0, description="steps between held-out evals logged as curves; 0 = end only")
    dtype: DType | None = Field(None, description="defaults to the recipe's `dtype`")
    master_weights: MasterWeights | None = Field(None, description="defaults to the recipe's `master_weights`")
    device: DeviceName | None = Field(None, description="defaults to the recipe's `device`")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters (needs peft); saved merged")
    keep_every: int = Field(
        0, ge=0, description="keep an HF snapshot every N steps under snapshots/step-N (staged teachers); 0 = none"
    )
    micro_batch_size: PositiveInt | Auto | None = Field(
        "auto",
        description="rows per forward/backward pass (rollouts for sampling stages); the step's gradient is "
        "accumulated over micro-batches, the same as the whole batch's up to float rounding, with the activation "
        "memory of one micro-batch; null: the whole batch at once; auto: sampling stages choose it from the "
        "shapes and `memory_budget_gib`, the others take the whole batch",
    )
    logit_chunk: PositiveInt | Auto | None = Field(
        "auto",
        description="positions per block of logits: the student's and teachers' logits ([rows, block, vocabulary]) "
        "are made from the final hidden states, turned into the loss and differentiated one block at a time "
        "(recomputed in backward), never all positions at once; the same loss and gradient up to float rounding; "
        "null: one block; auto: sampling stages choose it from the shapes (and, for the `sampled` and `grpo` "
        f"objectives, blocks of vocabulary columns over every position instead), the others take {DEFAULT_LOGIT_CHUNK}",
    )
    memory_budget_gib: float | None = Field(
        None, gt=0,
        description="the memory the `auto` settings may plan for (GiB); null: half of the memory available when "
        "the stage starts (the device's free memory on a GPU)",
    )
    resources: StageResources = Field(default_factory=StageResources, description="`--executor ray`: CPUs / GPUs this stage reserves")


class PretrainStage(TrainStage):
    """Next-token prediction on every token of a synthetic corpus (prompt and answer): a tiny base model."""

    kind: Literal["pretrain"]
    model: TinyModelConfig | None = Field(None, description="shape of a model built from scratch (when no init)")
    tokenizer: TokenizerSettings | None = Field(
        None, description="the tokenizer of the model built from scratch (and of its descendants); null: the "
        "recipe's `tokenizer`",
    )

    @model_validator(mode="after")
    def _model_or_init(self) -> PretrainStage:
        if (self.model is None) == (self.init is None):
            raise ValueError("a pretrain stage needs exactly one of `model` (build from scratch) or `init`")
        if self.tokenizer is not None and self.model is None:
            raise rule_error(self, "tokenizer", message="only a model built from scratch (`model:`) takes a "
                             "tokenizer; a stage that starts from `init` keeps its start's")
        return self


class SFTStage(TrainStage):
    """Token NLL on the reference answers only (the prompt is context, not a target)."""

    kind: Literal["sft"]
    init: str


class SamplingSettings(Strict):
    group_size: int = Field(8, gt=0, le=GROUP_MAX, description="completions sampled per prompt")
    log_samples: int = Field(
        0, ge=0, description="every this many steps, write a few rollouts of each domain as transcripts "
        "(<stage>/samples/train-<step>.jsonl, and the trackers' tables); 0 = none (evals always write theirs)",
    )
    max_new_tokens: int = Field(12, gt=0, le=NEW_TOKENS_MAX)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    is_mode: ISMode = IS_MODE
    eps_low: float = Field(EPS_LOW, gt=0, description="tokens with pi_theta/pi_sampler below this are dropped")
    eps_high: float = Field(EPS_HIGH, gt=1, description="... and above this")
    adv_clip: float | None = Field(ADV_CLIP, gt=0, description="|A| <= adv_clip")
    temperature_schedule: Literal["constant", "linear"] = Field(
        "constant", description="linear: from `temperature` at the first step to `temperature_end` at the last"
    )
    temperature_end: float | None = Field(None, gt=0, description="final temperature of a linear schedule")
    filter_solved: bool = Field(
        False, description="drop groups whose pass rate (reward == 1) is 0 or 1 from the loss; group_size >= 2"
    )
    curriculum: bool = Field(
        False, description="easiest difficulty first; the allowed maximum rises linearly over the steps"
    )
    domain_weights: dict[str, float] | None = Field(
        None, description="each domain's share of a step's prompts, relative (a domain left out weighs 1); "
        "null: equal shares"
    )
    rollout: RolloutWorkers | None = Field(
        None, description="sample each step group by group on rollout workers (`--executor ray`: sampler actors; "
        "local: in process), with a bounded weight lag; null: the whole-batch sampler in the learner",
    )
    learner: LearnerWorkers | None = Field(
        None, description="the update on `workers` data-parallel processes (`--executor ray`); null: one process",
    )
    micro_batch_by_length: bool | Auto = Field(
        "auto", description="micro-batches take the rows longest first, and each runs the student and teachers over "
        "its own columns only (not the columns that are padding in all its rows): the decoder's work on padding "
        "mostly goes; the same loss and gradient up to float rounding; auto: on when the step has several "
        "micro-batches",
    )

    @model_validator(mode="after")
    def _scaled_kind(self) -> SamplingSettings:
        if why := scale_problem(getattr(self, "kind", None), self.rollout, self.learner):
            raise ValueError(why)
        if self.micro_batch_by_length is True and getattr(self, "micro_batch_size", None) is None:
            raise ValueError("`micro_batch_by_length` sorts rows into micro-batches: set `micro_batch_size` too")
        return self

    @model_validator(mode="after")
    def _settings_agree(self) -> SamplingSettings:
        """Sampling settings that only make sense together, each refused at its own key."""
        if self.temperature_schedule == "linear" and self.temperature_end is None:
            raise rule_error(self, "temperature_schedule", message="a linear schedule needs `temperature_end`")
        if self.temperature_schedule == "constant" and self.temperature_end is not None:
            raise rule_error(self, "temperature_end", message="only used by `temperature_schedule: linear` (the "
                             "schedule is constant)")
        if self.filter_solved and self.group_size < 2:
            raise rule_error(self, "filter_solved", message="a group pass rate needs group_size >= 2 (got "
                             f"{self.group_size})")
        for d, w in (self.domain_weights or {}).items():
            if not w > 0:
                raise rule_error(self, "domain_weights", d, message=f"a weight must be above 0 (got {w})")
        return self

    reward: RewardSource = Field(DEFAULT_REWARD, description=REWARD_DESCRIPTION)


class RLVRStage(TrainStage, SamplingSettings):
    """GRPO with verifiable rewards: group-normalized reward as the advantage of every completion token."""

    kind: Literal["rlvr"]
    init: str


class MixRLStage(TrainStage, SamplingSettings):
    """Mix-RL baseline: one GRPO run on the union of the domains' prompts (the rlvr step with every domain)."""

    kind: Literal["mix_rl"]
    init: str


class CascadeRLStage(TrainStage, SamplingSettings):
    """Cascade-RL baseline: GRPO on one domain after another; the step's phase picks the domain.

    Steps are split evenly over `order` (earlier domains take the remainder) unless `steps_per_domain` is given.
    """

    kind: Literal["cascade_rl"]
    init: str
    order: list[str] = Field(min_length=1, description="domains in training order, each once")
    steps_per_domain: dict[str, int] | None = Field(None, description="domain -> steps; must sum to `steps`")

    @model_validator(mode="after")
    def _phases(self) -> CascadeRLStage:
        if self.domains is not None:
            raise ValueError("cascade_rl takes its domains from `order`, not `domains`")
        if len(set(self.order)) != len(self.order):
            raise ValueError("`order` lists a domain twice")
        if len(self.order) > self.steps:
            raise ValueError(f"{len(self.order)} domains in `order` need at least as many `steps`")
        if self.steps_per_domain is not None:
            if set(self.steps_per_domain) != set(self.order):
                raise ValueError("`steps_per_domain` must name exactly the domains of `order`")
            if any(n <= 0 for n in self.steps_per_domain.values()):
                raise ValueError("`steps_per_domain` values must be positive")
            if sum(self.steps_per_domain.values()) != self.steps:
                raise ValueError(
                    f"`steps_per_domain` sums to {sum(self.steps_per_domain.values())} but `steps` is {self.steps}"
                )
        return self


class OffPolicyFTStage(TrainStage):
    """Off-policy finetune (trace distillation): SFT on traces each domain's teacher samples for its prompts.

    Traces are drawn afresh every step from (seed, step), so a resumed stage sees the same traces. With
    `verified_only`, traces whose verifier reward is below `min_reward` are dropped. Usable as the `init` of a
    mopd stage (warm-up SFT on teacher traces before on-policy distillation).
    """

    kind: Literal["offpolicy_ft"]
    init: str
    teachers: dict[str, str] = Field(description="domain -> teacher (stage name or HF directory)")
    verified_only: bool = False
    min_reward: float = Field(1.0, ge=0, le=1, description="with verified_only: keep traces with reward >= this")
    max_new_tokens: int = Field(12, gt=0, le=NEW_TOKENS_MAX)
    temperature: float = Field(1.0, gt=0, description="teacher sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _threshold_needs_filter(self) -> OffPolicyFTStage:
        if not self.verified_only and "min_reward" in self.model_fields_set:
            raise ValueError("`min_reward` applies only with verified_only: true")
        return self


class MergeStage(Strict):
    """Parameter merging of teachers, no training.

    average:          theta = mean_i theta_i
    task_arithmetic:  theta = theta_base + lam * sum_i (theta_i - theta_base)   (Ilharco et al. 2023)
    """

    kind: Literal["merge"]
    base: str = Field(description="the checkpoint the teachers started from (stage name or HF directory)")
    models: list[str] = Field(min_length=1, description="the checkpoints to merge (the teachers)")
    method: Literal["average", "task_arithmetic"] = "average"
    lam: float = Field(1.0, description="task-vector scale; task_arithmetic only")
    resources: StageResources = Field(default_factory=StageResources, description="`--executor ray`: CPUs / GPUs this stage reserves")

    @model_validator(mode="after")
    def _lam_only_for_task_arithmetic(self) -> MergeStage:
        if self.method == "average" and "lam" in self.model_fields_set:
            raise ValueError("`lam` applies only to method: task_arithmetic")
        if len(set(self.models)) != len(self.models):
            raise ValueError("`models` lists a checkpoint twice")
        return self


class EvalStage(Strict):
    """Score checkpoints (stages or HF directories) on the held-out sets; results land in eval.json."""

    kind: Literal["eval"]
    models: list[str] = Field(min_length=1)
    domains: list[str] | None = None
    resources: StageResources = Field(default_factory=StageResources, description="`--executor ray`: CPUs / GPUs this stage reserves")


def fixed_micro_batch(stage: TrainStage) -> int | None:
    """`micro_batch_size` of a stage that does not choose it from the shapes: `auto` is the whole batch."""
    return None if stage.micro_batch_size == "auto" else stage.micro_batch_size


def fixed_logit_chunk(stage: TrainStage) -> int | None:
    """`logit_chunk` of a stage that does not choose it from the shapes: `auto` is `DEFAULT_LOGIT_CHUNK`."""
    return DEFAULT_LOGIT_CHUNK if stage.logit_chunk == "auto" else stage.logit_chunk
