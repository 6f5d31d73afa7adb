"""The `ppo` stage: the policy trained by PPO (`learner.ppo`) on its own rollouts, rewarded by the stage's
`reward` (verifier, reward model or judge), with a KL penalty to a frozen reference and a critic trained beside it.

One rollout serves `epochs` consecutive driver steps (one policy update each): step k samples when k % epochs == 0
and keeps the rollout with its old log-probabilities, reference log-probabilities, old values, advantages and
returns for the next epochs - 1 steps. The critic (a one-label token classifier on the `critic` checkpoint's
backbone; a `reward_model` stage's score head carries over) takes one AdamW update per step on the value loss,
inside the step. Where it is saved: <stage>/critic (an HF directory, `AutoModelForTokenClassification`), written
at the last step, before the policy's final/; at every policy checkpoint its weights and optimizer go to
<stage>/critic_checkpoints/step-N, so a resumed stage (which resumes at a checkpoint, a multiple of `epochs`:
checked at load) continues with the critic of that step.

The ratio rho compares the policy's log-probabilities at temperature 1 with those the policy had when the step's
rollout was made (recomputed then, not the sampler's tempered ones): at a sampling temperature != 1 the
samples are slightly off-policy for the objective, as in common PPO-for-LMs practice.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..core.errors import StageError
from ..core.schema import PPOStage, fixed_logit_chunk, fixed_micro_batch
from ..learner.micro_batches import accumulate_micro_batches, backward_outside_autocast
from ..learner.ppo import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    token_logprobs,
    token_rewards,
    token_values,
    whiten,
)
from ..learner.rollout import rollout
from ..models.checkpoint import load_trainer_state, save_checkpoint
from ..models.heads import scalar_head_model
from .driver import LossFn, train
from .lineage import lineage
from .loading import lazy_rollout_sampler, load_placed, placed
from .pairs import frozen
from .problems import problem_source, step_generator, step_rng, step_seed
from .resolved import ResolvedStage
from .rewards import stage_reward
from .samples import log_training_samples
from .schedules import temperature_at
from .start import starting_model

CRITIC = "critic"
CRITIC_CHECKPOINTS = "critic_checkpoints"


def run_ppo(ctx: ResolvedStage) -> Path:
    return train(ctx, starting_model(ctx), ppo_loss_fn(ctx))


def ppo_loss_fn(ctx: ResolvedStage) -> LossFn:
    s: PPOStage = ctx.settings
    reference = frozen(ctx, s.reference or s.init)
    reward = stage_reward(ctx)
    source = problem_source(ctx)
    rollouts = lazy_rollout_sampler(ctx)
    critic: dict = {}  # built at the first step: fresh at step 0, else the critic checkpoint of the resumed step
    kept: dict = {}  # the current rollout and what PPO fixed about it

    def collect(model, step: int) -> dict:
        problems = source.draw(step_rng(ctx.seed, step), s.batch_size, step=step)
        temperature = temperature_at(step, s.steps, s.temperature, s.temperature_end, s.temperature_schedule)
        batch, metrics = rollout(model, ctx.tokenizer, problems, ctx.domain_map, s, temperature=temperature,
                                 generator=step_generator(ctx.seed, step), sampler=rollouts(),
                                 prompt_format=ctx.prompt_format, reward=reward)
        log_training_samples(ctx, model, batch, step + 1)  # every `log_samples` steps that sample
        mask = batch.completion_mask_B_T
        with torch.no_grad():
            old_lp = token_logprobs(model, batch, fixed_logit_chunk(s))
            ref_lp = token_logprobs(reference, batch, fixed_logit_chunk(s))
            old_values = token_values(critic["model"], batch)
        rewards_B_T, reward_metrics = token_rewards(batch.rewards_B, old_lp, ref_lp, mask, s.kl_coef)
        advantages, returns = gae(rewards_B_T, old_values, mask, s.gamma, s.lam)
        metrics.update(reward_metrics)
        metrics["samples/student"] = len(problems) * s.group_size
        return {"batch": batch, "old_lp": old_lp, "old_values": old_values, "returns": returns,
                "advantages": whiten(advantages, mask), "metrics": metrics}

    def loss_fn(model, step):
        if not critic:
            critic.update(build_critic(ctx, step))
        fresh = step % s.epochs == 0 or not kept
        if fresh:
            kept.update(collect(model, step))
        batch, mask = kept["batch"], kept["batch"].completion_mask_B_T
        index = torch.arange(batch.size)

        def policy_part(rows: slice, share: float):  # `micro_batch_size` rows at a time, the whole step's mean
            sub = batch.select(index[rows])
            loss, m = clipped_policy_loss(token_logprobs(model, sub, fixed_logit_chunk(s)), kept["old_lp"][rows],
                                          kept["advantages"][rows], sub.completion_mask_B_T, s.clip)
            return loss * share, m, {}

        def value_part(rows: slice, share: float):
            sub = batch.select(index[rows])
            loss, m = clipped_value_loss(token_values(critic["model"], sub), kept["old_values"][rows],
                                         kept["returns"][rows], sub.completion_mask_B_T, s.value_clip)
            return s.vf_coef * loss * share, m, {}

        loss, metrics, _ = accumulate_micro_batches(policy_part, mask, fixed_micro_batch(s))
        value_loss, value_metrics, _ = accumulate_micro_batches(value_part, mask, fixed_micro_batch(s))
        update_critic(critic, value_loss, s.grad_clip)
        save_critic(ctx, critic, step + 1)
        metrics = {**value_metrics, **metrics, "loss": float(loss.detach()) + s.vf_coef * value_metrics[
            "ppo/value_loss"]}
        return loss, {**(kept["metrics"] if fresh else {"samples/student": 0}), **metrics}

    return loss_fn


def build_critic(ctx: ResolvedStage, step: int) -> dict:
    """The critic and its optimizer at 0-based `step`: new from `critic` (default init) at step 0, else restored
    from the critic checkpoint the policy resumed with. Its head is drawn from a generator of its own, so the
    global one (which a resumed stage restores) is untouched."""
    s: PPOStage = ctx.settings
    dtype = ctx.placement.weights_dtype
    if step == 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed(ctx.seed, 0, "critic"))
            model = scalar_head_model(ctx.model_refs[s.critic or s.init], "token_classifier",
                                      pad_token_id=ctx.tokenizer.pad_token_id, dtype=dtype)
        model = placed(ctx, model, dtype)
    else:
        path = ctx.stage_dir / CRITIC_CHECKPOINTS / f"step-{step:07d}"
        if not path.is_dir():
            raise StageError(f"stage {ctx.name!r}: resuming at step {step}, but its critic checkpoint {path} is "
                             "missing; move the stage directory aside to start over")
        model = load_placed(ctx, path, dtype)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.99))
    if step:
        opt.load_state_dict(load_trainer_state(path)["optimizer"])
    return {"model": model, "opt": opt}


def update_critic(critic: dict, loss: torch.Tensor, grad_clip: float | None) -> None:
    """One AdamW step of the critic on `loss` (skipped when it is not finite: the driver stops or skips the step).
    A loss with its graph is differentiated here; a detached one (micro-batches) left its gradient in `.grad`."""
    if not bool(torch.isfinite(loss.detach())):
        critic["opt"].zero_grad(set_to_none=True)
        return
    if loss.requires_grad:
        backward_outside_autocast(loss)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(critic["model"].parameters(), grad_clip)
    critic["opt"].step()
    critic["opt"].zero_grad(set_to_none=True)


def save_critic(ctx: ResolvedStage, critic: dict, done: int) -> None:
    """At a policy checkpoint's step, the critic's weights and optimizer (the last two kept); at the last step,
    the critic's HF directory <stage>/critic."""
    s: PPOStage = ctx.settings
    model, tokenizer = critic["model"], ctx.tokenizer
    if done == s.steps:
        save_checkpoint(ctx.stage_dir / CRITIC, model, tokenizer, lineage(ctx, done, {"role": "critic"}))
        shutil.rmtree(ctx.stage_dir / CRITIC_CHECKPOINTS, ignore_errors=True)
    elif done % s.checkpoint_every == 0:
        root = ctx.stage_dir / CRITIC_CHECKPOINTS
        save_checkpoint(root / f"step-{done:07d}", model, tokenizer, lineage(ctx, done, {"role": "critic"}),
                        trainer_state={"optimizer": critic["opt"].state_dict()})
        for old in sorted(root.glob("step-*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
