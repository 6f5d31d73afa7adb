"""The recipe schema above the stages: domains, tokenizer, evaluation, placement, report and comparison.

See `stages.py` for the stage kinds; together they are the whole recipe format (`mopd.core.schema`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, PrivateAttr, Tag, model_validator

from .bounds import BATCH_MAX, NEW_TOKENS_MAX, SEED_MAX, SEEDS_MAX, Seed
from .defaults import HELD_OUT_SEED, HELD_OUT_SIZE, MIN_TEACHER_GAIN
from .kinds import Stage
from .stages import NAME_PATTERN, DeviceName, DType, MasterWeights, Strict, TokenizerSettings
from .strict import rule_error


class EvalSettings(Strict):
    """Every trained stage is scored on each domain's fixed held-out set with greedy decoding."""

    size: int = Field(HELD_OUT_SIZE, gt=0, description="held-out prompts per domain")
    seed: int = HELD_OUT_SEED
    max_new_tokens: int = Field(12, gt=0, le=NEW_TOKENS_MAX)
    batch_size: int = Field(256, gt=0, le=BATCH_MAX)


class ReportSettings(Strict):
    student: str | None = Field(None, description="the MOPD stage the summary scores; default: the last one")
    min_teacher_gain: float = Field(
        MIN_TEACHER_GAIN, ge=0, le=1, description="a domain whose teacher gains less than this over the start "
        "(held-out score) is reported as 'teacher gain too small' and left out of the normalized score, with a "
        "warning (report, `mopd compare`, summary.json, sweeps)",
    )


class CompareSettings(Strict):
    """A comparison of merge methods (`mopd compare`): each scored by recovery against one start and teachers."""

    start: str = Field(description="the stage every method starts from (recovery's zero)")
    teachers: dict[str, str] = Field(description="domain -> teacher stage (recovery's one), for every domain")
    methods: dict[str, str] = Field(min_length=1, description="display name -> the stage that is its result")
    curves: list[str] | None = Field(
        None, description="methods drawn on the sample-efficiency plot; null = those whose stage is mopd or mix_rl"
    )


class DataFields(Strict):
    """Which source column holds each of our fields (see `mopd.data.load_prompts`)."""

    prompt: str = "prompt"
    answer: str | None = Field(
        None, description="reference completion / final answer; default: column `reference`, else `answer`"
    )
    tests: str | None = Field(None, description="code tests (a string or list of asserts); default: `tests`")
    constraints: str | None = Field(None, description="instruction constraints; default: `constraints`")


class DataDomainSpec(Strict):
    """A domain whose prompts come from data and whose rewards come from a real verifier (`mopd.envs.data`)."""

    name: str = Field(pattern=NAME_PATTERN)
    source: str = Field(
        description="bundled:math|code|instructions, a .jsonl/.json/.parquet file or datasets directory "
        "(relative to the recipe), or a Hub dataset id (read on first use)"
    )
    verifier: Literal["math", "code", "instructions", "exact"]
    format: Literal["jsonl", "json", "parquet", "datasets"] | None = Field(None, description="default: from source")
    split: str = "train"
    eval_split: str | None = Field(None, description="read held-out prompts from this split instead of holding out")
    domain_column: str | None = Field(None, description="column naming each record's domain (mixed data sets)")
    domain_value: str | None = Field(None, description="keep records whose domain column equals this")
    fields: DataFields = DataFields()
    eval_size: int | None = Field(
        None, gt=0, description="held-out prompts; default: eval.size, at most a quarter of the records"
    )
    limit: int | None = Field(None, gt=0, description="read at most this many records")
    code_timeout_s: float = Field(5.0, gt=0, description="wall-clock limit of one sandboxed code run")
    max_new_tokens: int | None = Field(
        None, gt=0, le=NEW_TOKENS_MAX, description="greedy tokens per held-out prompt in every evaluation of this domain; default: "
        "eval.max_new_tokens"
    )


class WandbSettings(Strict):
    """Weights & Biases: the run is resumed by an id kept in the run directory (`tracking/state.json`)."""

    project: str | None = Field(None, description="default: the recipe's name")
    entity: str | None = None
    mode: Literal["online", "offline"] | None = Field(
        None, description="offline writes under RUN/tracking/wandb (`wandb sync` uploads it); default: WANDB_MODE"
    )
    tags: list[str] = Field(default_factory=list)


class TrackioSettings(Strict):
    """trackio: a local SQLite store (trackio's own directory, TRACKIO_DIR), or a Hugging Face Space."""

    project: str | None = Field(None, description="default: the recipe's name")
    space_id: str | None = Field(None, description="log to this Space instead of the local store only")


class MlflowSettings(Strict):
    """MLflow: by default a SQLite store inside the run directory (RUN/tracking/mlflow.db); no server needed."""

    tracking_uri: str | None = Field(None, description="default: sqlite:///RUN/tracking/mlflow.db")
    experiment: str | None = Field(None, description="default: the recipe's name")


class LoggingSettings(Strict):
    """Experiment trackers that receive every metrics.jsonl record as `<stage>/<metric>` (each an extra:
    `pip install 'mopd[tensorboard]'`, ...); `mopd run --log NAME` turns one on with its defaults."""

    tensorboard: bool = Field(False, description="event files under RUN/tracking/tensorboard")
    wandb: WandbSettings | None = None
    trackio: TrackioSettings | None = None
    mlflow: MlflowSettings | None = None


class VerifiersDomainSpec(Strict):
    """An environment written with Prime Intellect's `verifiers` (v1), loaded by its taskset id as verifiers loads
    it (an installed package exporting its Taskset via `__all__`): its tasks are the problems, its rubric the
    reward, its toolsets the tools (`mopd.envs.verifiers_env`; needs mopd[verifiers])."""

    name: str = Field(pattern=NAME_PATTERN)
    verifiers: str = Field(description="the taskset id (its package's import name, e.g. my_calc_env)")
    settings: dict[str, Any] = Field(default_factory=dict, description="the taskset's config fields")
    eval_size: int | None = Field(None, gt=0, description="held-out tasks; default: a quarter, at most 96")
    answer_field: str = Field("answer", description="the task data's reference answer (what SFT trains on)")
    demonstration: str | None = Field(
        None, description="a tool-use taskset's gold turns, which SFT trains on (played through its tools): a "
        ".jsonl file (relative to the recipe) with one {prompt, turns} record per task, or a generator "
        "`file.py:function` / `package.module:function` from a task's data to its turns (tool calls in mopd's "
        "format, then the answer); null: SFT trains on the bare answer, so a model built from scratch never "
        "learns to call the tools (a warning at load)",
    )
    max_turns: int = Field(4, gt=0, description="model turns per episode (tool-use tasksets)")
    max_tokens: int = Field(48, gt=0, description="completion-window tokens per episode (tool-use tasksets)")
    tool_time_s: float = Field(1.0, gt=0, description="a tool call running longer is an error observation")
    max_observation_chars: int = Field(256, gt=0, description="longer tool results are truncated to this")
    max_parallel_calls: int = Field(4, gt=0, le=64, description="tool calls one turn may make, run concurrently; "
                                                               "each past it is an error observation")


def _domain_kind(v: Any) -> str:
    if isinstance(v, str):
        return "name"
    declares_verifiers = (isinstance(v, dict) and "verifiers" in v) or isinstance(v, VerifiersDomainSpec)
    return "verifiers" if declares_verifiers else "data"


ExecutorName = Literal["local", "ray"]  # what runs a recipe's stages (`executor:`, `--executor`)

DomainEntry = Annotated[
    Annotated[str, Tag("name")] | Annotated[DataDomainSpec, Tag("data")]
    | Annotated[VerifiersDomainSpec, Tag("verifiers")],
    Discriminator(_domain_kind),
]


class Recipe(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    seed: Seed = 0
    seeds: int = Field(
        1, ge=1, le=SEEDS_MAX, description="`mopd compare` / `mopd sweep`: run every method for this many seeds (seed, "
        "seed+1, ...), each in RUN/seed-<s>/, and report means with 95% intervals; `--seeds` overrides it. `mopd "
        "run` runs `seed` only. At most 1000: each seed is a whole run of every method",
    )
    plugins: list[str] = Field(default_factory=list, description="Python files that register domains")
    domains: list[DomainEntry] = Field(
        min_length=1, description="registered domain names, or data / verifiers domains declared as mappings"
    )
    tokenizer: TokenizerSettings = Field(
        TokenizerSettings(), description="the tokenizer of every model built from scratch (a pretrain stage's own "
        "`tokenizer:` overrides it for that model and its descendants)",
    )
    chat_template: Literal["auto", "none"] = Field(
        "auto", description="auto: render prompts with the tokenizer's chat template when it has one"
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra apply_chat_template arguments, e.g. {enable_thinking: false}"
    )
    dtype: DType = "auto"
    master_weights: MasterWeights = Field(
        "float32",
        description="precision of the trained weights and optimizer state: float32 (compute in `dtype` under "
        "autocast) or same (pure `dtype`: at bfloat16 most AdamW updates at lr 1e-6 round away)",
    )
    device: DeviceName = "auto"
    teacher_device: Literal["auto", "cpu", "same"] = Field(
        "auto",
        description="same: teachers stay on the student's device; cpu: kept on CPU and moved to the device only "
        "to score their rows; auto: same unless they would not fit beside the student",
    )
    rollout_backend: Literal["auto", "torch", "vllm"] = Field(
        "torch", description="vllm needs CUDA and vllm (untested on GPU); auto picks vllm when both are present"
    )
    vllm_memory_fraction: float = Field(0.3, gt=0, lt=1, description="GPU memory share of the vLLM engine")
    eval: EvalSettings = EvalSettings()
    stages: dict[str, Stage] = Field(min_length=1)
    report: ReportSettings = ReportSettings()
    compare: CompareSettings | None = None
    logging: LoggingSettings = LoggingSettings()
    executor: ExecutorName = Field(
        "local", description="local: stages one after another in this process; ray: every stage whose parents are "
        "finished runs as a Ray task with its `resources` (`--executor` overrides it; needs mopd[ray])",
    )
    scale: float = Field(
        1.0, gt=0, le=1, description="run the recipe at a reduced scale (tests, a quick look): steps, batch sizes "
        "and held-out sets times this, each with a small floor; method settings unchanged; part of every stage's "
        "identity (`mopd run --scale` overrides it)",
    )

    _data_domains: dict[int, DataDomainSpec | VerifiersDomainSpec] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _last_seed_fits(self) -> Recipe:
        if self.seed + self.seeds - 1 > SEED_MAX:
            raise rule_error(self, "seed", message=f"seeds {self.seed} to {self.seed + self.seeds - 1} (`seeds`: "
                             f"{self.seeds}) go past {SEED_MAX} (a seed is an unsigned 64-bit integer)")
        return self

    @model_validator(mode="after")
    def _names_only(self) -> Recipe:
        """After validation `domains` holds names only, so every consumer compares plain strings; the data
        domains' declarations move to `data_domains` (keyed by their position in the list)."""
        self._data_domains = {i: d for i, d in enumerate(self.domains) if not isinstance(d, str)}
        self.domains = [d if isinstance(d, str) else d.name for d in self.domains]
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"`domains` names a domain twice: {self.domains}")
        return self

    @property
    def data_domains(self) -> dict[int, DataDomainSpec | VerifiersDomainSpec]:
        """Position in `domains` -> declaration, for the domains declared as mappings (data, verifiers)."""
        return dict(self._data_domains)
