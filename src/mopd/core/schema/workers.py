"""How a sampling stage spreads one step over processes: rollout workers and a data-parallel learner
(issue 16, docs/SCALING.md). Their workers are Ray actors under `--executor ray`; the local executor samples
the same groups in process, and refuses a data-parallel learner."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# the stage kinds whose step is `stages.rl.policy_step_fn`, where rollout and learner workers are wired
SCALED_KINDS = ("rlvr", "mix_rl", "cascade_rl", "mopd")


def scale_problem(kind: str | None, rollout: object, learner: object) -> str | None:
    """Why a stage's `rollout:` / `learner:` cannot apply to its kind, or None."""
    if (rollout is not None or learner is not None) and kind not in SCALED_KINDS:
        return f"`rollout:` and `learner:` workers are built for {', '.join(SCALED_KINDS)} stages, not {kind}"
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class RolloutWorkers(_Strict):
    """A step's rollouts sampled by `workers` sampler actors, `groups_per_call` groups at a time, each group from
    its own seed, so the batch does not depend on how many workers there are or which one sampled a group (it
    differs from the default whole-batch sampler's, which draws every row from one generator). `workers` is not
    part of the stage's identity, nor are its resources; `max_lag` and `groups_per_call` are (they change what is
    trained)."""

    workers: int = Field(1, ge=1, description="sampler actors (Ray); the local executor samples the same groups "
                         "in process")
    max_lag: int = Field(0, ge=0, description="0: every step's rollouts come from that step's weights; k: the "
                         "learner accepts rollouts sampled up to k updates earlier (the next step is sampled while "
                         "this one trains); the lag is logged as `rollout/lag`")
    groups_per_call: int = Field(8, ge=1, description="groups a worker samples in one batched call (one forward over "
                                 "their rows, each group's tokens from its own seed); fixed here, not by the number "
                                 "of workers, so the batch does not depend on it; 1: group by group. In the identity "
                                 "(a batched forward rounds differently)")
    cpus: float = Field(1.0, gt=0, description="CPU cores each rollout worker reserves (and its torch threads, at "
                        "least 1)")
    gpus: float = Field(0.0, ge=0, description="GPUs each rollout worker reserves (a vLLM engine needs 1)")


class LearnerWorkers(_Strict):
    """The update on `workers` processes in one torch.distributed group (gloo on CPU, NCCL on GPU), each taking
    a share of the step's micro-batches; the gradients are summed, so the step's gradient is the one-worker
    gradient up to float rounding. Not part of the stage's identity."""

    workers: int = Field(1, ge=1, description="learner processes (Ray actors) in the data-parallel group")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every worker holds the whole model and optimizer state, gradients are all-reduced; "
        "fsdp: the decoder layers' weights, gradients and optimizer state are sharded over the workers (FSDP2), "
        "the embedding and head replicated, and rank 0 keeps an unsharded copy to sample, evaluate and save "
        "(docs/SCALING.md)")
