"""Rollout workers (`rollout: {workers: N, max_lag: k}`): N sampler actors generate a step's rollouts from the
learner's current weights, `groups_per_call` groups at a time (`sampling.grouped`), so the batch is the one the
in-process grouped sampler makes for the same (seed, step), whichever worker sampled which group.

The protocol: the learner publishes its weights once per step into Ray's object store with a version (the number
of updates applied: the step's index); every worker's answer carries the version it sampled with; the learner
refuses an answer more than `max_lag` versions old (it samples that step again from the current weights) and logs
the lag of what it used (`rollout/lag`). With `max_lag` >= 1 the next step's rollouts are sampled while this step
trains (one step of lag). A worker that dies is restarted by Ray and its call retried: the call carries the
weights' object reference, so the restarted worker loads them again and samples the same groups from the same
seeds, and the run's numbers do not change.

Ray is imported only here, and only when a stage asks for rollout workers under `--executor ray`; without Ray
the local executor runs `grouped_sampler` in process (the same batches).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.batch import RolloutBatch
from ..envs import Problem
from ..learner.rollout import rollout_rows
from ..models.prompting import PromptFormat
from ..sampling.grouped import concat_batches, group_rows, group_seeds, sample_groups
from .resolved import ResolvedStage

WORKER_RESTARTS = 2  # a rollout worker that dies is restarted (and its call retried) this many times


@dataclass(frozen=True)
class Published:
    """The learner's weights as published for a step: the version, the weights' object reference, and the
    reference of the student's copy (the module the weights load into; the same for every version)."""

    version: int
    weights: Any
    skeleton: Any


class RolloutWorker:
    """One sampler actor: a copy of the student (the learner's model class and attention), loaded with each new
    version of the weights once, sampling the groups it is handed. `backend` torch or vllm (a vLLM engine per
    actor on its own GPU: wired, untested without a GPU)."""

    def __init__(self, tokenizer, placement, backend: str, threads: int, engine: dict | None = None):
        torch.set_num_threads(threads)
        # the student's copy comes with the first call (`Published.skeleton`), not as a constructor argument: a
        # restartable actor with an object-store argument makes Ray log an error line at every start
        # (ray-project/ray#53727), and a restarted worker reads it again from its first call
        self.model: torch.nn.Module | None = None
        self.tokenizer, self.placement = tokenizer, placement
        self.version = -1
        self.sampler: Callable[..., RolloutBatch]
        if backend == "vllm":
            from ..sampling.vllm_backend import VLLMSampler

            self.engine = VLLMSampler(**(engine or {}))
            self.engine.sync_weights = lambda _model: None  # synced once per version below, not once per group
            self.sampler = self.engine
        else:
            from ..sampling.sampler import sample

            self.engine, self.sampler = None, sample

    def sample(self, published: Published, seeds: list[int], groups: list[list[int]], rows: dict,
               settings: dict, groups_per_call: int) -> tuple[list[RolloutBatch], int]:
        """The groups' batches (in order) and the version they were sampled with."""
        if published.version != self.version:
            import ray

            if self.model is None:
                self.model = ray.get(published.skeleton)
                if self.placement.device.type == "cuda" and torch.cuda.is_available():  # Ray gave this actor a GPU
                    self.model.to(self.placement.device)
            self.model.load_state_dict(ray.get(published.weights))  # a reference nested in an argument
            if self.engine is not None:
                type(self.engine).sync_weights(self.engine, self.model)
            self.version = published.version
        with self.placement.precision():
            parts = sample_groups(self.sampler, self.model, self.tokenizer, rows["prompts"], seeds=seeds,
                                  groups=groups, domains=rows["domains"], group_ids=rows["group_ids"],
                                  references=rows["references"], groups_per_call=groups_per_call, **settings)
        return [p.to("cpu") for p in parts], published.version

    def pid(self) -> int:
        import os

        return os.getpid()


class RolloutPool:
    """The learner's side of the protocol: a step's groups shared out in contiguous shards (their seeds drawn
    in the learner, in order), stale answers refused, the next step prefetched when `max_lag` allows.

    `workers` None: the in-process twin (the local executor), which samples the same groups from the same seeds
    with the learner's model at the moment a step is submitted, so its numbers are the Ray pool's."""

    def __init__(self, ctx: ResolvedStage, model: torch.nn.Module, workers: int | None, max_lag: int,
                 base: Callable[[], Callable[..., RolloutBatch]]):
        self.max_lag, self.tokenizer, self.device = max_lag, ctx.tokenizer, ctx.placement.device
        self.settings = ctx.settings
        self.per_call = ctx.settings.rollout.groups_per_call
        self.base = base() if workers is None else None  # in process: the stage's sampler (torch or vLLM)
        self.actors: list = []
        self.published: Published | None = None
        self.pending: dict[int, tuple[list, int, tuple]] = {}  # step -> (answers or refs, version, the call)
        self.metrics: dict[str, float] = {}
        if workers is None:
            return
        import ray

        self.ray = ray
        backend = worker_backend(ctx.rollout_backend)
        engine = None if backend == "torch" else dict(
            model_path=ctx.init_path, tokenizer=ctx.tokenizer, dtype=ctx.placement.compute_dtype,
            memory_fraction=ctx.vllm_memory_fraction, seed=ctx.seed)
        spec = ctx.settings.rollout
        actor = ray.remote(RolloutWorker)
        options = dict(num_cpus=spec.cpus, num_gpus=spec.gpus, max_restarts=WORKER_RESTARTS,
                       max_task_retries=WORKER_RESTARTS)
        # the student's copy, put once and kept referenced here; each call carries its reference (`Published`)
        self.skeleton = ray.put(copy.deepcopy(model).to("cpu"))
        threads = max(1, int(spec.cpus))
        self.actors = [actor.options(name=worker_name(ctx.name, i), **options).remote(
            ctx.tokenizer, ctx.placement, backend, threads, engine) for i in range(workers)]

    def publish(self, model: torch.nn.Module, version: int) -> Published:
        """The weights of `version` in the object store, put once however many workers and calls read them."""
        if self.published is None or self.published.version != version:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.published = Published(version, self.ray.put(weights), self.skeleton)
        return self.published

    def _start(self, model: torch.nn.Module, version: int, call: tuple) -> list:
        """Sample a call's groups: Ray object references of each shard's answer, or (in process) the answer."""
        seeds, groups, rows, settings = call
        if not self.actors:
            parts = sample_groups(self.base, model, self.tokenizer, rows["prompts"], seeds=seeds, groups=groups,
                                  domains=rows["domains"], group_ids=rows["group_ids"],
                                  references=rows["references"], groups_per_call=self.per_call, **settings)
            return [(parts, version)]
        published = self.publish(model, version)
        return [a.sample.remote(published, seeds[sl], groups[sl], rows, settings, self.per_call)
                for a, sl in zip(self.actors, _shards(len(groups), len(self.actors), self.per_call), strict=True)
                if sl.stop > sl.start]

    def submit(self, step: int, model: torch.nn.Module, version: int, *, generator: torch.Generator,
               prompts: list[str], domains: list[str], group_ids: list[int], references: list[str] | None = None,
               **settings) -> None:
        """Start sampling step `step`'s groups with the weights of `version` (the learner's `model` now)."""
        groups = group_rows(group_ids)
        rows = {"prompts": prompts, "domains": domains, "group_ids": group_ids, "references": references or []}
        call = (group_seeds(generator, len(groups)), groups, rows, settings)
        self.pending[step] = (self._start(model, version, call), version, call)

    def take(self, step: int, model: torch.nn.Module, version: int) -> RolloutBatch:
        """Step `step`'s batch; an answer more than `max_lag` versions old is refused and the step sampled again
        from the current weights. Sets `metrics`: the lag used and whether an answer was refused."""
        started, _, call = self.pending.pop(step)
        answers = started if not self.actors else self.ray.get(started)
        used = min(v for _, v in answers)
        refused = version - used > self.max_lag
        if refused:
            answers = self._start(model, version, call)
            answers = answers if not self.actors else self.ray.get(answers)
            used = min(v for _, v in answers)
        self.metrics = {"rollout/lag": float(version - used), "rollout/refused": float(refused)}
        return concat_batches([p for parts, _ in answers for p in parts], self.tokenizer.pad_token_id).to(self.device)

    def sampler(self, step: int) -> Callable[..., RolloutBatch]:
        """A callable with `sample`'s signature for `learner.rollout.rollout` at `step` (the weights' version):
        the prefetched answer of `step` if there is one, else sampled now."""

        def sample_step(model, _tokenizer, prompts, *, generator, **rest) -> RolloutBatch:
            if step not in self.pending:
                self.submit(step, model, step, generator=generator, prompts=prompts, **rest)
            return self.take(step, model, step)

        return sample_step

    def prefetch(self, step: int, model: torch.nn.Module, problems: list[Problem], *, temperature: float,
                 generator: torch.Generator, prompt_format: PromptFormat) -> None:
        """With `max_lag` >= 1: start sampling step `step` now, from the weights of step `step - 1` (before its
        update), so it overlaps this step's update; `step`'s rollouts then carry a lag of 1."""
        if self.max_lag < 1 or step in self.pending:
            return
        s = self.settings
        self.submit(step, model, step - 1, generator=generator, **rollout_rows(problems, s.group_size),
                    max_new_tokens=s.max_new_tokens, temperature=temperature, top_p=s.top_p,
                    prompt_format=prompt_format)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


def worker_backend(requested: str) -> str:
    """The rollout workers' sampler: `vllm` when the recipe asks for it (the workers' GPUs run it, the learner
    may have none), else what `auto` picks on this machine; never an engine built in the learner to find out."""
    from ..sampling.backend import choose_backend

    return "vllm" if requested == "vllm" else choose_backend(requested)


def _shards(groups: int, workers: int, groups_per_call: int = 1) -> list[slice]:
    """Contiguous slices of the groups, one per worker, cut at call boundaries (multiples of `groups_per_call`)
    with near-equal numbers of calls (the first workers one call more), so each worker's calls are the calls the
    in-process sampler makes."""
    calls = -(-groups // groups_per_call)
    size, extra = divmod(calls, workers)
    out, start = [], 0
    for w in range(workers):
        stop = start + size + (w < extra)
        out.append(slice(min(start * groups_per_call, groups), min(stop * groups_per_call, groups)))
        start = stop
    return out


def worker_name(stage: str, index: int) -> str:
    """The Ray actor name of a stage's rollout worker (`ray.get_actor` finds it: tests, debugging)."""
    return f"mopd:{stage}:rollout{index}"


def rollout_pool(ctx: ResolvedStage, base: Callable[[], Callable[..., RolloutBatch]]) -> LazyPool | None:
    """The stage's rollout pool, built on first use from the learner's model (None without `rollout:`): Ray
    sampler actors under `--executor ray`, the in-process twin under the local executor."""
    spec = ctx.rollout_workers
    if spec is None:
        return None
    return LazyPool(ctx, base, spec.workers if ctx.executor == "ray" else None, spec.max_lag)


@dataclass
class LazyPool:
    """`pool(model)`: the stage's pool, built on the first step (a stage that resumes finished builds none);
    `close()` when the stage ends (its actors would otherwise outlive it in a reused Ray worker)."""

    ctx: ResolvedStage
    base: Callable[[], Callable[..., RolloutBatch]]
    workers: int | None
    max_lag: int
    built: RolloutPool | None = None

    def __call__(self, model: torch.nn.Module) -> RolloutPool:
        if self.built is None:
            self.built = RolloutPool(self.ctx, model, self.workers, self.max_lag, self.base)
        return self.built

    def close(self) -> None:
        if self.built is not None:
            self.built.close()
