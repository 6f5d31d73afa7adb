"""Where a stage's rewards come from (`reward:`): the domain's verifier, a reward model, a judge, or a mapping
from domain to one of those.

Why a per-domain form: the reports' mixed RL stages (GLM-5's general RL, DeepSeek-V3.2's one mixed GRPO stage)
reward verifiable prompts by rules and open-ended ones by a reward model or judge, in the same stage. With
`{per_domain: {style: {judge: ...}}}` the listed domains take their source and every other domain its verifier.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from .strict import Strict


class RewardModelReward(Strict):
    """Rewards from a Bradley-Terry reward model: sigmoid of its score of (prompt, completion), in (0, 1)."""

    reward_model: str = Field(description="a `reward_model` stage, or an HF sequence-classification directory")


class JudgeReward(Strict):
    """Rewards from a causal LM judging against a rubric (LLM-as-judge / RLAIF): the judge's per-token geometric
    mean probability of the completion after `rubric` + prompt, in (0, 1] (`learner.judge`)."""

    judge: str = Field(description="a causal LM: a stage of this recipe or an HF directory")
    rubric: str = Field(min_length=1, description="text the judge reads before the prompt")


# the source of a stage that names none, and of a domain `per_domain` leaves out: the domain's own rules
DEFAULT_REWARD = "verifier"
SOURCE_DESCRIPTION = "`verifier` (the domain's rules), {reward_model: STAGE_OR_DIR} or {judge: STAGE_OR_DIR, rubric: TEXT}"
REWARD_DESCRIPTION = SOURCE_DESCRIPTION + ", or {per_domain: {DOMAIN: one of those}} (other domains: their verifier)"


def _one_source(v: object) -> object:
    """One clear line for a malformed reward source (a union's own errors would name its first branch)."""
    if isinstance(v, str) and v != "verifier":
        raise ValueError(f"unknown reward source {v!r}: use {SOURCE_DESCRIPTION}")
    if isinstance(v, dict):
        if "judge" in v and "rubric" not in v:
            raise ValueError("a judge needs a `rubric` (the text it reads before the prompt)")
        if not {"judge", "reward_model"} & set(v):
            raise ValueError(f"a reward source is {SOURCE_DESCRIPTION}")
    return v


# one source: the domain's verifier (rules), a reward model, or a judge
OneRewardSource = Annotated[Literal["verifier"] | RewardModelReward | JudgeReward, BeforeValidator(_one_source)]


class PerDomainReward(Strict):
    """A source per listed domain; the stage's other domains are rewarded by their verifiers."""

    per_domain: dict[str, OneRewardSource] = Field(min_length=1, description="domain -> " + SOURCE_DESCRIPTION)


def _reward_source(v: object) -> object:
    """As `_one_source`, and for the per-domain form: its shape, then each domain's source, in one line."""
    if not (isinstance(v, dict) and "per_domain" in v):
        return _one_source(v)
    if set(v) != {"per_domain"}:
        raise ValueError("`per_domain` is a reward source of its own: no other keys beside it")
    mapping = v["per_domain"]
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError("per_domain maps domains to reward sources, e.g. {per_domain: {style: {judge: MODEL, "
                         "rubric: TEXT}}}")
    for domain, source in mapping.items():
        try:
            _one_source(source)
        except ValueError as e:
            raise ValueError(f"per_domain.{domain}: {e}") from None
        if isinstance(source, dict) and (unknown := set(source) - {"judge", "rubric", "reward_model"}):
            raise ValueError(f"per_domain.{domain}: unknown keys {sorted(unknown)}")
    return v


# where a stage's rewards come from
RewardSource = Annotated[
    Literal["verifier"] | RewardModelReward | JudgeReward | PerDomainReward, BeforeValidator(_reward_source)
]


def reward_of(stage: object) -> object:
    """A stage's `reward`; the default source for a kind that has no `reward` setting (a merge, an sft stage), so
    every reader of a stage's rewards asks one question whatever the kind."""
    return getattr(stage, "reward", DEFAULT_REWARD)


def reward_parts(reward: object) -> list[tuple[tuple[str, ...], str | None, object]]:
    """(key path under `reward`, domain or None for every domain, one source) of a stage's `reward`."""
    if isinstance(reward, PerDomainReward):
        return [(("per_domain", d), d, source) for d, source in reward.per_domain.items()]
    return [((), None, reward)]


def source_of(reward: object, domain: str) -> object:
    """The one source that rewards `domain`'s rows under a stage's `reward`."""
    if isinstance(reward, PerDomainReward):
        return reward.per_domain.get(domain, DEFAULT_REWARD)
    return reward
