"""The `reward_model` stage: a Bradley-Terry reward model (`learner.reward_model`) on preference pairs
(`pairs.py`), its held-out pair accuracy as the stage's eval, saved as an HF sequence-classification checkpoint.

With `pairs_from: policy` the answers are sampled by the frozen `init` (the policy the reward model will judge,
InstructGPT's SFT model) and ranked by the stage's `reward`. The held-out pairs are built once, before step 0,
on the held-out eval prompts of the stage's domains (never trained on) with a generator of their own, or are
every 10th pair of a dataset, so a resumed stage scores the same pairs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.schema import DatasetPairs, RewardModelStage, fixed_micro_batch
from ..data.pairs import read_pairs, split_pairs
from ..envs import Problem
from ..learner.reward_model import pair_accuracy, reward_model_loss
from ..models.heads import scalar_head_model
from .driver import LossFn, train
from .pairs import frozen, pair_rows, pairs_fn, prompt_pairs_fn
from .problems import step_seed
from .resolved import ResolvedStage

EVAL_NAME = "preference_pairs"  # the stage's eval entry: {"score": held-out pair accuracy, "margin", "pairs"}


def run_reward_model(ctx: ResolvedStage) -> Path:
    s: RewardModelStage = ctx.settings
    sampler = None if isinstance(s.pairs_from, DatasetPairs) else frozen(ctx, s.init)  # samples, never trains
    chosen, rejected = held_out_pairs(ctx, sampler)

    def evaluate(model) -> dict[str, dict[str, float]]:
        metrics = pair_accuracy(model, ctx.tokenizer, chosen, rejected, ctx.prompt_format)
        return {EVAL_NAME: {"score": metrics["accuracy"], "margin": metrics["margin"], "pairs": metrics["pairs"]}}

    def build(dtype: torch.dtype) -> torch.nn.Module:
        return scalar_head_model(ctx.init_path, "sequence_classifier", pad_token_id=ctx.tokenizer.pad_token_id,
                                 dtype=dtype)

    return train(ctx, build, reward_model_loss_fn(ctx, sampler), evaluate)


def reward_model_loss_fn(ctx: ResolvedStage, sampler: torch.nn.Module | None) -> LossFn:
    s: RewardModelStage = ctx.settings
    build_pairs = pairs_fn(ctx)

    def loss_fn(model, step):
        chosen, rejected, metrics = build_pairs(sampler, step)
        metrics["rm/pairs"] = len(chosen)
        if not chosen:  # every prompt tied: no update this step
            return torch.zeros(()), {"loss": 0.0, **metrics}
        loss, loss_metrics = reward_model_loss(model, ctx.tokenizer, chosen, rejected,
                                               micro_batch_size=fixed_micro_batch(s), prompt_format=ctx.prompt_format)
        return loss, {**loss_metrics, **metrics}

    return loss_fn


def held_out_pairs(ctx: ResolvedStage, sampler: torch.nn.Module | None) -> tuple[list[Problem], list[Problem]]:
    """The pairs the stage's accuracy is measured on: the dataset's held-out pairs, or pairs built on up to
    `eval_pairs` held-out eval prompts (round-robin over the stage's domains)."""
    s: RewardModelStage = ctx.settings
    if isinstance(s.pairs_from, DatasetPairs):
        return pair_rows(split_pairs(read_pairs(s.pairs_from.dataset))[1])
    sets = [d.eval_set(ctx.eval.size, seed=ctx.eval.seed) for d in ctx.domains]
    prompts = [p for group in zip(*sets, strict=False) for p in group][: s.eval_pairs]
    generator = torch.Generator().manual_seed(step_seed(ctx.seed, 0, "reward-model-eval"))
    chosen, rejected, _ = prompt_pairs_fn(ctx)(sampler, prompts, generator)
    return chosen, rejected
