"""Rollout workers and the data-parallel learner (issue 16): group-by-group sampling does not depend on how the
groups are shared out; a stale rollout is refused unless `max_lag` allows it, and the lag is logged; under
`--executor ray` a miniature recipe (2 concurrent teacher stages, 2 rollout workers, 2 learner workers on gloo)
gives the local executor's numbers: exactly with 1 learner worker, even when a rollout worker is killed mid-stage;
to float rounding with 2 (DDP, or FSDP through a killed rank 0)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mopd.core.batch import RolloutBatch
from mopd.core.errors import RecipeError, StageError
from mopd.core.schema import RLVRStage, RolloutWorkers
from mopd.envs import ALPHABET, get_domain
from mopd.execution.runner import run_recipe
from mopd.learner.rollout import rollout_rows
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.identity import stage_identities
from mopd.recipe.load import load_recipe
from mopd.sampling.grouped import concat_batches, group_rows, group_seeds, grouped_sampler, sample_groups
from mopd.sampling.sampler import next_tokens, next_tokens_by_group, sample
from mopd.stages.rollout_workers import RolloutPool, _shards, worker_name

from .test_executor_ray import _kill_stage_worker

TOK = build_char_tokenizer(ALPHABET)
TINY = TinyModelConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=48)
SETTINGS = dict(max_new_tokens=6, temperature=1.0, top_p=1.0)

MINI = """\
name: mini_scale
seed: 0
domains: [addition, reversal]
eval: {size: 8, max_new_tokens: 8}
stages:
  base:
    kind: pretrain
    model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
    steps: 4
    batch_size: 12
  teacher_add:
    kind: rlvr
    init: base
    domains: [addition]
    steps: 2
    batch_size: 2
    group_size: 2
  teacher_rev:
    kind: rlvr
    init: base
    domains: [reversal]
    steps: 2
    batch_size: 2
    group_size: 2
  student:
    kind: mopd
    init: base
    teachers: {addition: teacher_add, reversal: teacher_rev}
    steps: 6
    batch_size: 4
    group_size: 2
    alpha: 0.5
    checkpoint_every: 3
    rollout: {workers: 2, cpus: 0.5, groups_per_call: 2}
    resources: {cpus: 0.5}
"""
STAGES = ("base", "teacher_add", "teacher_rev", "student")
# the CI miniature of issue 16: 2 learner workers on gloo, 2 rollout workers, the 2 teachers on Ray actors
DP_AND_ACTOR_TEACHERS = """\
    learner: {workers: 2}
    teacher_backends:
      teacher_add: {backend: actor, resources: {cpus: 0}}
      teacher_rev: {backend: actor, resources: {cpus: 0}}
"""


@pytest.fixture
def one_thread():
    """Tiny models sample fastest on one thread (two threads on a busy 2-core machine: ~30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(n: int = 5, group: int = 3) -> dict:
    rng = random.Random(0)
    problems = [*get_domain("addition").sample_train(rng, n - 2), *get_domain("reversal").sample_train(rng, 2)]
    return rollout_rows(problems, group)


def _same(a: RolloutBatch, b: RolloutBatch) -> bool:
    fields = ("input_ids_B_T", "attention_mask_B_T", "completion_mask_B_T", "sampler_logprobs_B_T", "group_ids_B")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields) and a.completions == b.completions


def test_concat_repads_each_part_to_one_layout():
    """A part with a 2-token prompt and 1 completion token beside one with a 1-token prompt and 2: prompts
    left-padded, completions right-padded, every real token kept with its mask and logprob."""
    def part(prompt: list[int], completion: list[int], lp: list[float], group: int) -> RolloutBatch:
        ids = torch.tensor([prompt + completion])
        P = len(prompt)
        comp = torch.tensor([[0.0] * P + [1.0] * len(completion)])
        return RolloutBatch(ids, torch.ones_like(ids), comp, torch.tensor([[0.0] * P + lp]), ["d"],
                            torch.tensor([group]), ["p"], ["c"], ["r"])

    batch = concat_batches([part([5, 6], [7], [-0.5], 0), part([8], [9, 10], [-1.0, -2.0], 1)], pad_id=0)
    assert batch.input_ids_B_T.tolist() == [[5, 6, 7, 0], [0, 8, 9, 10]]
    assert batch.attention_mask_B_T.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert batch.completion_mask_B_T.tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]
    assert batch.sampler_logprobs_B_T.tolist() == [[0, 0, -0.5, 0], [0, 0, -1.0, -2.0]]
    assert batch.group_ids_B.tolist() == [0, 1] and batch.completions == ["c", "c"]


def test_groups_sampled_by_any_split_make_the_same_batch(one_thread):
    """The groups of a step sampled all together, or in the shards two or three workers would get, or one at a
    time: the same tensors. Each group's tokens depend on its own seed only."""
    model = build_tiny_model(TINY, len(TOK), TOK, 0)
    rows = _rows()
    groups = group_rows(rows["group_ids"])
    seeds = group_seeds(torch.Generator().manual_seed(7), len(groups))
    whole = grouped_sampler(sample)(model, TOK, generator=torch.Generator().manual_seed(7), **rows, **SETTINGS)
    for shards in ([slice(0, 3), slice(3, 5)], [slice(0, 2), slice(2, 4), slice(4, 5)],
                   [slice(i, i + 1) for i in range(5)]):
        parts = [p for sl in shards for p in sample_groups(sample, model, TOK, rows["prompts"], seeds=seeds[sl],
                                                           groups=groups[sl], domains=rows["domains"],
                                                           group_ids=rows["group_ids"],
                                                           references=rows["references"], **SETTINGS)]
        assert _same(concat_batches(parts, TOK.pad_token_id), whole)
    assert whole.size == 15 and len(set(whole.completions)) > 1


@pytest.mark.parametrize("per_call", [2, 5])
def test_batched_calls_make_the_same_batch_however_the_workers_share_them(per_call, one_thread):
    """`per_call` groups per batched forward, each group's tokens from its own seed: the workers' shards (cut at
    call boundaries) sample the in-process twin's batch, for 1, 2 or 3 workers."""
    model = build_tiny_model(TINY, len(TOK), TOK, 0)
    rows = _rows()
    groups = group_rows(rows["group_ids"])
    seeds = group_seeds(torch.Generator().manual_seed(7), len(groups))
    whole = grouped_sampler(sample, per_call)(model, TOK, generator=torch.Generator().manual_seed(7), **rows,
                                              **SETTINGS)
    for workers in (1, 2, 3):
        parts = [p for sl in _shards(len(groups), workers, per_call)
                 for p in sample_groups(sample, model, TOK, rows["prompts"], seeds=seeds[sl], groups=groups[sl],
                                        domains=rows["domains"], group_ids=rows["group_ids"],
                                        references=rows["references"], groups_per_call=per_call, **SETTINGS)]
        assert _same(concat_batches(parts, TOK.pad_token_id), whole), workers
    assert whole.size == 15 and len(set(whole.completions)) > 1


def test_each_group_draws_from_its_own_generator(one_thread):
    """One group covering every row is `generator` itself, token for token; with two groups each group's tokens
    are those its own generator draws from its rows' logits (a fresh generator per group, not one stream)."""
    model = build_tiny_model(TINY, len(TOK), TOK, 0)
    prompts = ["12+34=", "12+34=", "ab|", "ab|"]
    one = sample(model, TOK, prompts, generator=torch.Generator().manual_seed(3), **SETTINGS)
    same = sample(model, TOK, prompts, draw_groups=[(4, torch.Generator().manual_seed(3))], **SETTINGS)
    assert _same(one, same)
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(0))
    tok, lp = next_tokens_by_group(logits, 1.0, 1.0, [(2, torch.Generator().manual_seed(1)),
                                                      (2, torch.Generator().manual_seed(2))])
    for (a, b), seed in (((0, 2), 1), ((2, 4), 2)):
        alone = next_tokens(logits[a:b], 1.0, 1.0, torch.Generator().manual_seed(seed))
        assert torch.equal(tok[a:b], alone[0]) and torch.equal(lp[a:b], alone[1])
    with pytest.raises(ValueError, match="draw_groups cover 3 rows of 4"):
        sample(model, TOK, prompts, draw_groups=[(3, torch.Generator())], **SETTINGS)


def test_groups_are_shared_out_in_contiguous_near_equal_shards():
    assert group_rows([0, 0, 1, 1, 1, 2]) == [[0, 1], [2, 3, 4], [5]]
    assert _shards(5, 2) == [slice(0, 3), slice(3, 5)]
    assert _shards(2, 3) == [slice(0, 1), slice(1, 2), slice(2, 2)]  # a worker with no group is not called
    # cut at call boundaries: 5 groups in calls of 2 are calls [0, 2), [2, 4), [4, 5)
    assert _shards(5, 2, 2) == [slice(0, 4), slice(4, 5)]
    assert _shards(5, 3, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert _shards(2, 3, 2) == [slice(0, 2), slice(2, 2), slice(2, 2)]


def _pool(max_lag: int) -> RolloutPool:
    """The in-process twin of a rollout pool (the Ray one runs the same protocol in its actors)."""
    ctx = SimpleNamespace(tokenizer=TOK, placement=SimpleNamespace(device=torch.device("cpu")),
                          settings=RLVRStage(kind="rlvr", init="x", steps=3, group_size=3, max_new_tokens=6,
                                             rollout=RolloutWorkers(groups_per_call=1)))
    return RolloutPool(ctx, None, None, max_lag, lambda: sample)


@pytest.mark.parametrize("max_lag", [0, 1])
def test_a_stale_rollout_is_refused_unless_the_lag_is_allowed(max_lag, one_thread):
    """Step 1's rollouts were started with version 0's weights; the learner then updated the weights to version
    1. With max_lag 0 they are refused and step 1 is sampled again from version 1's weights; with max_lag 1 they
    are used, and the lag of 1 is reported."""
    model = build_tiny_model(TINY, len(TOK), TOK, 0)
    updated = build_tiny_model(TINY, len(TOK), TOK, 1)
    rows = _rows()
    pool = _pool(max_lag)
    pool.submit(1, model, 0, generator=torch.Generator().manual_seed(7), **rows, **SETTINGS)
    model.load_state_dict(updated.state_dict())  # the update of step 0
    batch = pool.take(1, model, 1)
    old = grouped_sampler(sample)(build_tiny_model(TINY, len(TOK), TOK, 0), TOK,
                                  generator=torch.Generator().manual_seed(7), **rows, **SETTINGS)
    new = grouped_sampler(sample)(updated, TOK, generator=torch.Generator().manual_seed(7), **rows, **SETTINGS)
    assert not _same(old, new)
    if max_lag == 0:
        assert _same(batch, new) and pool.metrics == {"rollout/lag": 0.0, "rollout/refused": 1.0}
    else:
        assert _same(batch, old) and pool.metrics == {"rollout/lag": 1.0, "rollout/refused": 0.0}


def test_workers_are_not_in_the_identity_but_the_lag_is(tmp_path):
    def ids(text: str) -> dict[str, str]:
        (tmp_path / "r.yaml").write_text(text)
        return stage_identities(load_recipe(tmp_path / "r.yaml"))

    plain = ids(MINI.replace("    rollout: {workers: 2, cpus: 0.5, groups_per_call: 2}\n", ""))
    two = ids(MINI)
    assert two == ids(MINI.replace("workers: 2, cpus: 0.5", "workers: 3") + "    learner: {workers: 2}\n")
    assert two["student"] != plain["student"]  # grouped sampling draws other tokens than the whole-batch sampler
    assert {k: v for k, v in two.items() if k != "student"} == {k: v for k, v in plain.items() if k != "student"}
    assert ids(MINI.replace("groups_per_call: 2}", "groups_per_call: 2, max_lag: 1}"))["student"] != two["student"]
    assert ids(MINI.replace("groups_per_call: 2}", "groups_per_call: 1}"))["student"] != two["student"]


def test_max_lag_one_trains_one_step_behind_and_logs_it(tmp_path, one_thread):
    """Local executor: from step 2 on, each step's rollouts were sampled before the previous update."""
    text = MINI.replace("groups_per_call: 2}", "groups_per_call: 2, max_lag: 1}").replace("    steps: 6\n", "    steps: 3\n")
    (tmp_path / "r.yaml").write_text(text)
    run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "run", threads=1)
    records = [json.loads(x) for x in (tmp_path / "run" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/lag"] for r in records if "rollout/lag" in r] == [0.0, 1.0, 1.0]


def test_a_data_parallel_learner_needs_the_ray_executor(tmp_path):
    (tmp_path / "r.yaml").write_text(MINI + "    learner: {workers: 2}\n")
    with pytest.raises(StageError, match=r"stage 'student': `learner: \{workers: 2\}` runs its ranks as Ray tasks"):
        run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_workers_on_a_sampling_kind_without_them_are_refused_at_load(tmp_path):
    """ppo samples too, but its step is not the policy step the workers are wired into: refused, one line."""
    (tmp_path / "r.yaml").write_text(MINI + "  tuned:\n    kind: ppo\n    init: base\n    steps: 1\n"
                                     "    rollout: {workers: 2}\n")
    with pytest.raises(RecipeError, match=r"`rollout:` and `learner:` workers are built for rlvr, .*not ppo"):
        load_recipe(tmp_path / "r.yaml")


def test_a_stage_whose_workers_outgrow_the_cluster_is_one_line_before_compute(tmp_path, ray_local):
    """2 learner ranks of 1 CPU and 2 rollout workers of 1 CPU: 4 CPUs, on a 2-CPU Ray instance."""
    text = MINI.replace("workers: 2, cpus: 0.5,", "workers: 2, cpus: 1,").replace("resources: {cpus: 0.5}",
                                                                                "resources: {cpus: 1}")
    (tmp_path / "r.yaml").write_text(text + "    learner: {workers: 2}\n")
    with pytest.raises(StageError, match=r"stage 'student': resources ask for 4 CPUs \(its learner ranks and "
                                         r"rollout workers together\); the Ray cluster has 2"):
        run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "run", executor="ray")
    assert not (tmp_path / "run").exists()


def _kill_a_rollout_worker(ray, run: Path, killed: list[int], stop: threading.Event) -> None:
    """Once the student has logged a step, SIGKILL its first rollout worker's process (by its pid)."""
    metrics = run / "student" / "metrics.jsonl"
    while not stop.is_set():
        if metrics.exists() and metrics.read_text().strip():
            try:
                actor = ray.get_actor(worker_name("student", 0))
                pid = ray.get(actor.pid.remote(), timeout=10)
            except Exception:
                time.sleep(0.02)
                continue
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.02)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    """The miniature recipe by the local executor; by Ray with 1 learner worker (a rollout worker killed during
    the student); then the student again by Ray with 2 learner workers and its teachers on Ray actors (not part
    of its identity), from the Ray run's finished parents."""
    root = tmp_path_factory.mktemp("scale")
    (root / "mini.yaml").write_text(MINI)
    loaded = load_recipe(root / "mini.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_recipe(loaded, root / "local")
    finally:
        torch.set_num_threads(threads)
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_rollout_worker, args=(ray_local, root / "ray", killed, stop))
    killer.start()
    try:
        run_recipe(loaded, root / "ray", executor="ray", threads=1)
    finally:
        stop.set()
        killer.join()
    (root / "dp.yaml").write_text(MINI + DP_AND_ACTOR_TEACHERS)
    shutil.copytree(root / "ray", root / "dp", ignore=shutil.ignore_patterns("student"))
    run_recipe(load_recipe(root / "dp.yaml"), root / "dp", executor="ray", threads=1)
    # FSDP on 2 ranks, rank 0's worker killed after the step-3 checkpoint: Ray retries, the ranks resume from it
    (root / "fsdp.yaml").write_text(MINI + "    learner: {workers: 2, strategy: fsdp}\n")
    shutil.copytree(root / "ray", root / "fsdp", ignore=shutil.ignore_patterns("student"))
    stop.clear()
    fsdp_killed: list[float] = []
    killer = threading.Thread(target=_kill_stage_worker, args=("student", root / "fsdp" / "student", fsdp_killed,
                                                                 stop))
    killer.start()
    try:
        run_recipe(load_recipe(root / "fsdp.yaml"), root / "fsdp", executor="ray", threads=1)
    finally:
        stop.set()
        killer.join()
    return root, {"rollout": killed, "fsdp": fsdp_killed}


def _records(run: Path, stage: str) -> list[dict]:
    lines = (run / stage / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time")} for x in lines]


def test_ray_rollout_workers_give_the_local_numbers_through_a_killed_worker(runs):
    root, killed = runs
    assert len(killed["rollout"]) == 1  # a rollout worker really died mid-stage
    for stage in STAGES:
        assert _records(root / "ray", stage) == _records(root / "local", stage), stage
    local = load_file(root / "local" / "student" / "final" / "model.safetensors")
    remote = load_file(root / "ray" / "student" / "final" / "model.safetensors")
    assert all(torch.equal(local[k], remote[k]) for k in local)
    # that the two teacher stages run at the same time is tested in test_executor_ray on stages long enough to
    # overlap: these take half a second, less than Ray needs to start a second worker process on a busy machine


@pytest.mark.parametrize("strategy", ["dp", "fsdp"])
def test_two_learner_workers_give_the_one_worker_numbers_to_rounding(runs, strategy):
    """DDP; and FSDP, whose rank 0 was killed after a checkpoint (its ranks resumed from the gathered state)."""
    root, killed = runs
    if strategy == "fsdp":
        assert len(killed["fsdp"]) == 1  # the FSDP student's rank 0 really died after its first checkpoint
        info = json.loads((root / "fsdp" / "run.json").read_text())["stages"]["student"]
        assert info["started_at"] > killed["fsdp"][0]  # the entry is the retried attempt's ...
        assert info["wall_seconds"] > info["ended_at"] - info["started_at"]  # ... which resumed from a checkpoint
    one, two = _records(root / "local", "student"), _records(root / strategy, "student")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two, strict=True):
        assert b.keys() == a.keys()
        for k, v in a.items():
            assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (a["step"], k)
