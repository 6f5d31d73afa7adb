"""The comparison baselines on a miniature recipe (seconds): mix_rl, cascade_rl, offpolicy_ft, merge."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from mopd.core.schema import CascadeRLStage, OffPolicyFTStage
from mopd.execution.resolve import resolve_stage
from mopd.execution.runner import run_recipe
from mopd.models.checkpoint import load_model
from mopd.models.merge import merge_state_dicts
from mopd.recipe.identity import stage_identities
from mopd.recipe.load import RecipeError, load_recipe
from mopd.stages import baselines
from mopd.stages.baselines import cascade_domain, cascade_spans, teacher_traces, trace_sampler
from mopd.stages.problems import problem_source, step_generator, step_rng

from .mini_compare import recipe

STAGES = """\
mix: {kind: mix_rl, init: sft, steps: 3, batch_size: 2, group_size: 2}
cascade: {kind: cascade_rl, init: sft, order: [sorting, reversal], steps: 3, batch_size: 2, group_size: 2}
offpolicy:
  kind: offpolicy_ft
  init: sft
  teachers: {reversal: teacher_rev, sorting: teacher_sort}
  steps: 3
  batch_size: 4
distilled:
  kind: mopd
  init: offpolicy
  teachers: {reversal: teacher_rev, sorting: teacher_sort}
  steps: 1
  batch_size: 2
merge_avg: {kind: merge, base: sft, models: [teacher_rev, teacher_sort]}
merge_ta: {kind: merge, base: sft, models: [teacher_rev, teacher_sort], method: task_arithmetic, lam: 0.7}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("baselines")
    (d / "r.yaml").write_text(recipe(STAGES))
    run_recipe(load_recipe(d / "r.yaml"), d / "out", Console(quiet=True))
    return d / "out"


def _rows(out: Path, stage: str) -> list[dict]:
    return [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]


def _params(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# ---------------------------------------------------------------------------------------------- merge arithmetic


def test_merge_average_and_task_arithmetic_exact() -> None:
    base = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([7])}
    a = {"w": torch.tensor([3.0, 2.0]), "n": torch.tensor([1])}
    b = {"w": torch.tensor([1.0, 6.0]), "n": torch.tensor([2])}
    avg = merge_state_dicts(base, [a, b], "average")
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0]))
    ta = merge_state_dicts(base, [a, b], "task_arithmetic", lam=0.5)
    # base + 0.5 * ((3-1, 2-2) + (1-1, 6-2)) = (1 + 1, 2 + 2)
    assert torch.equal(ta["w"], torch.tensor([2.0, 4.0]))
    ta1 = merge_state_dicts(base, [a, b], "task_arithmetic", lam=1.0)
    assert torch.equal(ta1["w"], torch.tensor([3.0, 6.0]))
    assert torch.equal(avg["n"], torch.tensor([7])) and torch.equal(ta["n"], torch.tensor([7]))  # ints: base's
    assert ta["w"].dtype == torch.float32


def test_merge_rejects_shape_mismatch_by_name() -> None:
    with pytest.raises(ValueError, match="'w' has shape"):
        merge_state_dicts({"w": torch.zeros(2)}, [{"w": torch.zeros(3)}], "average")


def test_merge_stages_write_merged_checkpoints(run: Path) -> None:
    sft, rev, sort = (_params(run / s / "final") for s in ("sft", "teacher_rev", "teacher_sort"))
    avg, ta = _params(run / "merge_avg" / "final"), _params(run / "merge_ta" / "final")
    for k in sft:
        torch.testing.assert_close(avg[k], (rev[k] + sort[k]) / 2)
        torch.testing.assert_close(ta[k], sft[k] + 0.7 * ((rev[k] - sft[k]) + (sort[k] - sft[k])))
    assert any(not torch.equal(avg[k], sft[k]) for k in sft)  # the teachers moved, so the merge did too
    lineage = json.loads((run / "merge_ta" / "final" / "mopd.json").read_text())
    assert lineage["kind"] == "merge" and lineage["init_stage"] == "sft"
    assert set(lineage["parents"]) == {"sft", "teacher_rev", "teacher_sort"}
    assert set(lineage["metrics"]["eval"]) == {"reversal", "sorting"} and lineage["metrics"]["samples"] == 0


# ---------------------------------------------------------------------------------------------- RL baselines


def test_mix_rl_samples_every_domain_and_counts_rollouts(run: Path) -> None:
    rows = [r for r in _rows(run, "mix") if "loss" in r]
    assert [r["samples"] for r in rows] == [4, 8, 12]  # steps x batch 2 x group 2, cumulative
    for r in rows:
        assert {"reward/reversal", "reward/sorting"} <= set(r)  # balanced over the union of the domains


def test_cascade_spans_and_phases() -> None:
    s = CascadeRLStage(kind="cascade_rl", init="x", order=["a", "b", "c"], steps=10)
    assert cascade_spans(s) == [("a", 4), ("b", 7), ("c", 10)]
    assert [cascade_domain(cascade_spans(s), i) for i in range(10)] == list("aaaabbbccc")
    s = CascadeRLStage(kind="cascade_rl", init="x", order=["b", "a"], steps=5, steps_per_domain={"a": 1, "b": 4})
    assert cascade_spans(s) == [("b", 4), ("a", 5)]


def test_cascade_trains_one_domain_after_another(run: Path) -> None:
    rows = [r for r in _rows(run, "cascade") if "loss" in r]
    domains = [sorted(k[len("reward/"):] for k in r if k.startswith("reward/") and k != "reward/mean") for r in rows]
    assert domains == [["sorting"], ["sorting"], ["reversal"]]  # 3 steps over [sorting, reversal]: 2, 1
    assert rows[-1]["samples"] == 12


# ---------------------------------------------------------------------------------------------- off-policy FT


def test_offpolicy_counts_teacher_traces_not_student_samples(run: Path) -> None:
    rows = _rows(run, "offpolicy")
    train = [r for r in rows if "loss" in r]
    assert [r["teacher_samples"] for r in train] == [4, 8, 12] and all(r["samples"] == 0 for r in rows)
    assert all(r["offpolicy/kept_frac"] == 1.0 for r in train)  # verified_only is off: every trace is kept
    lineage = json.loads((run / "offpolicy" / "final" / "mopd.json").read_text())
    assert lineage["teachers"]["reversal"]["stage"] == "teacher_rev"


def test_offpolicy_is_usable_as_init_of_mopd(run: Path) -> None:
    lineage = json.loads((run / "distilled" / "final" / "mopd.json").read_text())
    assert lineage["init_stage"] == "offpolicy" and lineage["init"] == str(run / "offpolicy" / "final")


def test_verified_only_keeps_exactly_the_traces_at_or_above_threshold(run: Path) -> None:
    # a stub verifier with known, varied rewards, so the filter is tested whatever the tiny teachers produce
    reward_of = {}

    class Stub:
        @staticmethod
        def verify(problem, completion):
            return reward_of[problem.prompt]

    stubs = {name: Stub for name in ("reversal", "sorting")}
    loaded = load_recipe(run / "recipe.yaml")
    ctx = resolve_stage(loaded, "offpolicy", run, stage_identities(loaded))
    teachers = {t: (load_model(run / t / "final"), *trace_sampler(ctx, str(run / t / "final")))
                for t in ("teacher_rev", "teacher_sort")}
    problems = problem_source(ctx).draw(step_rng(0, 0), 12)
    reward_of.update({p.prompt: (i % 4) / 3 for i, p in enumerate(problems)})  # 0, 1/3, 2/3, 1, 0, ...
    base = dict(kind="offpolicy_ft", init="sft", teachers={"reversal": "teacher_rev", "sorting": "teacher_sort"},
                steps=1)
    every, m_all = teacher_traces(problems, OffPolicyFTStage(**base), teachers, step_generator(0, 0), stubs)
    assert len(every) == 12 and m_all["offpolicy/kept_frac"] == 1.0
    kept, metrics = teacher_traces(problems, OffPolicyFTStage(**base, verified_only=True, min_reward=0.5),
                                   teachers, step_generator(0, 0), stubs)
    expect = [t for t in every if reward_of[t.prompt] >= 0.5]
    assert kept == expect and len(expect) == 6  # same traces (same generator), only the verified half kept
    assert metrics["offpolicy/kept_frac"] == 0.5
    assert metrics["offpolicy/teacher_reward"] == pytest.approx(sum(reward_of.values()) / 12)


# ---------------------------------------------------------------------------------------------- placement


def _ctx(run: Path, stage: str, stage_dir: Path, **recipe_keys: str):
    """`stage` of the finished `run` resolved with recipe keys overridden, writing to `stage_dir`."""
    from dataclasses import replace

    loaded = load_recipe(run / "recipe.yaml")
    loaded = replace(loaded, recipe=loaded.recipe.model_copy(update=recipe_keys))
    ctx = resolve_stage(loaded, stage, run, stage_identities(loaded))
    ctx = dataclasses.replace(ctx, stage_dir=stage_dir)
    return ctx


def test_offpolicy_teachers_are_placed_in_the_stage_precision(run: Path, monkeypatch) -> None:
    """Off-policy teachers are frozen models like MOPD's: on the stage's device in its compute dtype (they were
    loaded in float32 on the host whatever the recipe said, so a GPU run sampled its teachers on the CPU)."""
    seen = {}

    def record(problems, s, teachers, generator, domains):
        seen.update({name: next(model.parameters()).dtype for name, (model, *_) in teachers.items()})
        return [], {}

    monkeypatch.setattr(baselines, "teacher_traces", record)
    loss_fn = baselines.offpolicy_loss_fn(_ctx(run, "offpolicy", run / "unused", dtype="bfloat16"))
    loss, _ = loss_fn(None, 0)
    assert seen == {"teacher_rev": torch.bfloat16, "teacher_sort": torch.bfloat16} and not loss.requires_grad


def test_merge_evaluates_in_the_stage_precision_and_saves_float32(run: Path, tmp_path: Path, monkeypatch) -> None:
    """The merged model is scored as a trained stage is (autocast to `dtype` over float32 weights on the stage's
    device), and its checkpoint is the exact float32 merge."""
    from mopd.stages import merge

    seen = {}

    def record(ctx, model):
        seen.update(autocast=torch.is_autocast_enabled("cpu"), compute=torch.get_autocast_dtype("cpu"),
                    weights=next(model.parameters()).dtype)
        return {}

    monkeypatch.setattr(merge, "eval_metrics", record)
    out = merge.run_merge(_ctx(run, "merge_avg", tmp_path, dtype="bfloat16"))
    assert seen == {"autocast": True, "compute": torch.bfloat16, "weights": torch.float32}
    got, want = _params(out), _params(run / "merge_avg" / "final")
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("stage", "key", "needle"),
    [
        ("c: {kind: cascade_rl, init: sft, order: [sorting, addition], steps: 2}", "stages.c.order.1",
         "domain 'addition' is not in the recipe's `domains`"),
        ("c: {kind: cascade_rl, init: sft, order: [sorting, reversal], steps: 3, steps_per_domain: {sorting: 1, "
         "reversal: 1}}", "stages.c", "sums to 2 but `steps` is 3"),
        ("o: {kind: offpolicy_ft, init: sft, teachers: {reversal: teacher_rev}, steps: 1}", "stages.o.teachers",
         "domain 'sorting' has no teacher"),
        ("o: {kind: offpolicy_ft, init: sft, teachers: {reversal: teacher_rev, sorting: nope}, steps: 1}",
         "stages.o.teachers.sorting", "'nope' is neither a stage"),
        ("m: {kind: merge, base: sft, models: [teacher_rev, ghost]}", "stages.m.models.1", "'ghost' is neither"),
        ("m: {kind: merge, base: sft, models: [teacher_rev], lam: 0.5}", "stages.m",
         "`lam` applies only to method: task_arithmetic"),
        ("m: {kind: merge, base: nothing, models: [teacher_rev]}", "stages.m.base", "'nothing' is neither"),
    ],
)
def test_bad_baseline_stages_fail_in_one_line(tmp_path: Path, stage: str, key: str, needle: str) -> None:
    text = recipe(stage + "\n")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    line = next(i for i, x in enumerate(text.splitlines(), 1) if x.strip().startswith(stage.split(":")[0] + ":"))
    assert "\n" not in msg and needle in msg, msg
    assert msg.startswith(f"{path}:") and f": {key}:" in msg, msg
    assert int(msg.split(":")[1]) == line, msg
