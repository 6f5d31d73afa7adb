"""A stage resolved once, by the runner, before any of its compute: the one object stages and the driver read.

Why: device, precision, seed, domains, prompt rendering, the starting checkpoint and the teachers' checkpoints
are each decided in one place (`execution.resolve.resolve_stage`), so no module below re-derives them from the
recipe, and nothing during a stage reads process-wide state (the domain registry is read once, at load).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.schema import EvalSettings, ExecutorName, LearnerWorkers, RewardSource, RolloutWorkers, Stage
from ..envs import DomainLike
from ..learner.strategy import LOCAL, Learner
from ..models.precision import Placement
from ..models.prompting import PromptFormat, Rendering


@dataclass(frozen=True)
class TeacherRef:
    """One teacher of a stage: where its final checkpoint is, and the checkpoint each `teacher_schedule` phase
    scores with (empty without a schedule)."""

    name: str  # a stage of the recipe, or an external reference as written
    identity: str  # the stage's identity, or the resolved external reference
    checkpoint: str  # the final checkpoint (a directory, or a Hub id)
    phases: tuple[str, ...] = ()


def _log_warning(message: str) -> None:
    logging.getLogger("mopd").warning(message)


def _ignore(*args: object) -> None:
    pass


def _log_info(message: str) -> None:
    logging.getLogger("mopd").info(message)


@dataclass(frozen=True)
class StageHooks:
    """Where a running stage reports to: the runner's console and trackers (not settings: they decide nothing)."""

    progress: Callable[[int, int, dict[str, float]], None] = _ignore  # (step, total, metrics)
    warn: Callable[[str], None] = _log_warning  # one-line warnings (the console; a library user's log)
    record: Callable[[dict], None] = _ignore  # each metrics.jsonl record (experiment trackers)
    note: Callable[[str], None] = _log_info  # one-line facts a stage states once (the step settings it chose)


@dataclass(frozen=True)
class ResolvedStage:
    name: str
    settings: Stage  # one of the stage kinds of `core.schema`, exactly as the recipe declared it
    identity: str
    seed: int
    stage_dir: Path
    placement: Placement
    domains: list[DomainLike]  # the stage's training domains
    eval_domains: list[DomainLike]  # the recipe's domains: every trained stage is scored on each
    eval: EvalSettings
    tokenizer: Any  # the starting model's tokenizer (the recipe's character tokenizer for a model from scratch)
    prompt_format: PromptFormat  # how this stage renders prompts for `tokenizer`
    rendering: Rendering  # the recipe's `chat_template` choice, for models scored with their own tokenizer
    init_ref: str | None  # the `init` (or a merge's `base`) as written in the recipe
    init_path: str | None  # ... resolved: a finished checkpoint or HF directory / id
    model_refs: dict[str, str]  # stage name / reference -> checkpoint path
    parents: dict[str, str]  # parent name -> its identity
    teachers: dict[str, TeacherRef]  # teacher name -> where it is (mopd, offpolicy_ft; else empty)
    teacher_of_domain: dict[str, str]  # domain -> teacher name (mopd, offpolicy_ft; else empty)
    rollout_backend: str  # the recipe's `rollout_backend`
    vllm_memory_fraction: float  # the recipe's `vllm_memory_fraction`
    reward: RewardSource  # the stage's `reward:` (the domains' verifiers for a kind without one)
    rollout_workers: RolloutWorkers | None  # `rollout:` (None: the learner samples)
    learner_workers: LearnerWorkers | None  # `learner:` (None: one process)
    executor: ExecutorName = "local"  # local (this process) or ray (rollout workers / learner ranks as Ray actors)
    hooks: StageHooks = StageHooks()
    learner: Learner = LOCAL  # how the trained model is laid out: one process, or this rank of a DDP/FSDP group

    @property
    def domain_map(self) -> dict[str, DomainLike]:
        """Domain name -> domain, for the stage's and the recipe's domains (a row's verifier by its name)."""
        return {d.name: d for d in [*self.eval_domains, *self.domains]}
