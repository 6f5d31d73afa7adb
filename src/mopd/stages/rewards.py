"""A stage's reward source (`reward:`), loaded once per stage: None for the domains' verifiers, else a frozen
reward model or judge turned into a `learner.rollout.RewardFn`; the per-domain form routes each row to its
domain's source (a verifier, a reward model or a judge) and keeps the rows' order.

Each scores with its own tokenizer and the recipe's prompt rendering for it: a completion is text, so a reward
model or judge with another vocabulary would still score it correctly (the loader still refuses a reward model
whose tokenizer differs from the policy's, see `recipe.tokenizer_checks`).
"""

from __future__ import annotations

from ..core.schema import JudgeReward, PerDomainReward, RewardModelReward, RewardSource
from ..learner.judge import judge_reward
from ..learner.reward_model import reward_model_reward
from ..learner.rollout import RewardFn, rewards_by_domain
from ..models.checkpoint import load_tokenizer
from ..models.prompting import with_pad_token
from .loading import load_placed
from .resolved import ResolvedStage


def stage_reward(ctx: ResolvedStage, source: RewardSource | None = None) -> RewardFn | None:
    """The reward function of `source` (default: the stage's `reward`); None means the domains' verifiers."""
    source = ctx.reward if source is None else source
    if source == "verifier":
        return None
    if isinstance(source, PerDomainReward):
        return _per_domain(ctx, source)
    ref = source.reward_model if isinstance(source, RewardModelReward) else source.judge
    path = ctx.model_refs[ref]
    model = load_placed(ctx, path).eval().requires_grad_(False)
    tokenizer = with_pad_token(load_tokenizer(path))
    prompt_format = ctx.rendering.format_for(tokenizer)
    if isinstance(source, JudgeReward):
        return judge_reward(model, tokenizer, source.rubric, prompt_format)
    return reward_model_reward(model, tokenizer, prompt_format)


def _per_domain(ctx: ResolvedStage, reward: PerDomainReward) -> RewardFn:
    """The listed domains' sources (a model listed for several domains is loaded once), routed by domain."""
    loaded: dict[str, RewardFn] = {}
    sources: dict[str, RewardFn] = {}
    for domain, source in reward.per_domain.items():
        if source != "verifier":
            key = source.model_dump_json()
            if key not in loaded:
                loaded[key] = stage_reward(ctx, source)
            sources[domain] = loaded[key]
    return rewards_by_domain(sources, ctx.domain_map)
