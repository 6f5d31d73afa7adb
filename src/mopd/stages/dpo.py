"""The `dpo` stage: preference pairs (`pairs.py`: ranked samples of the policy, OLMo 3's delta pairs, or a
dataset), then `learner.preference.dpo_loss` against a frozen reference (Tülu 3 and Llama 3's preference stage).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.schema import DPOStage, fixed_logit_chunk, fixed_micro_batch
from ..learner.preference import dpo_loss
from .driver import LossFn, train
from .pairs import frozen, pairs_fn
from .resolved import ResolvedStage
from .start import starting_model


def run_dpo(ctx: ResolvedStage) -> Path:
    return train(ctx, starting_model(ctx), dpo_loss_fn(ctx))


def dpo_loss_fn(ctx: ResolvedStage) -> LossFn:
    s: DPOStage = ctx.settings
    reference = frozen(ctx, s.reference or s.init)
    build_pairs = pairs_fn(ctx)

    def loss_fn(model, step):
        chosen, rejected, metrics = build_pairs(model, step)
        metrics["dpo/pairs"] = len(chosen)
        if not chosen:  # every prompt tied: no update this step
            return torch.zeros(()), {"loss": 0.0, **metrics}
        loss, loss_metrics = dpo_loss(model, reference, ctx.tokenizer, chosen, rejected, beta=s.beta, loss=s.loss,
                                      length_normalized=s.length_normalized, micro_batch_size=fixed_micro_batch(s),
                                      prompt_format=ctx.prompt_format, logit_chunk=fixed_logit_chunk(s))
        return loss, {**loss_metrics, **metrics}

    return loss_fn
