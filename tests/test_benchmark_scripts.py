"""The speed benchmarks' own arithmetic: the FLOP split of a step by phase that docs/BENCHMARKS.md reports."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def roofline(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module("roofline")
    yield module
    for name in ("roofline", "_common", "trl_vs_mopd"):
        sys.modules.pop(name, None)


def test_phase_breakdown_splits_the_whole_step_and_restores_what_it_wraps(roofline, tmp_path) -> None:
    import mopd.learner.policy as learner_policy
    from mopd.models.checkpoint import load_model
    from mopd.sampling.sampler import sample
    from mopd.teachers.panel import TeacherPanel

    common = roofline._common
    torch.manual_seed(0)
    paths = common.build_models(tmp_path)
    tok = common.build_char_tokenizer(common.ALPHABET)
    originals = (learner_policy.student_scores, TeacherPanel.sampled_logprobs, torch.Tensor.backward)

    def fresh_step():  # the same weights and optimizer state for both counts
        return common.mopd_step_fn(load_model(paths["student"]), {"t": load_model(paths["teacher0"])}, tok,
                                   common.mopd_settings(4, "sampled"), {d: "t" for d in common.DOMAINS})

    batch = common.problems(6)
    phases = roofline.phase_breakdown(fresh_step(), batch, 3)
    assert (learner_policy.student_scores, TeacherPanel.sampled_logprobs, torch.Tensor.backward) == originals
    # sampling is what the step leaves over: count it directly, the same rollouts drawn with the step's seed
    with FlopCounterMode(display=False) as counter:
        sample(load_model(paths["student"]), tok, [p.prompt for p in batch], max_new_tokens=4, temperature=1.0,
               top_p=1.0, generator=torch.Generator().manual_seed(3), domains=[p.domain for p in batch],
               group_ids=list(range(len(batch))), references=[p.answer for p in batch])
    gflop = {k: v for k, v in phases.items() if k != "real_token_fraction"}
    assert gflop["sampling (prefill + KV-cached decode)"] == pytest.approx(counter.get_total_flops() / 1e9, abs=2e-3)
    assert all(v > 0 for v in gflop.values()), gflop
    # the teacher (2.77M parameters) scores what the student (0.79M) trains on: about 3.5x its forward
    assert 2.5 < gflop["teacher scoring"] / gflop["student training forward"] < 4.5
    # backward of the student's matrix multiplies: about twice their forward
    assert 1.5 < gflop["backward"] / gflop["student training forward"] < 2.5
    assert 0 < phases["real_token_fraction"] < 1  # prompts of different lengths are left-padded


def test_real_shape_benchmark_runs_both_tools_at_a_miniature_shape(monkeypatch, tmp_path) -> None:
    """benchmarks/real_shape.py at a miniature of its shape: TRL's DistillationTrainer and mopd's step train the same
    models on the same prompts, with completion lengths that vary, and the curves plot (an OOM point included)."""
    pytest.importorskip("trl")
    monkeypatch.syspath_prepend(str(BENCH))
    real_shape = importlib.import_module("real_shape")
    try:
        real_shape.build(tmp_path, vocab=300, n_teachers=1, student_hidden=16, teacher_hidden=32)
        args = argparse.Namespace(models=tmp_path, vocab=300, batch=4, completion=12, teachers=1, steps=2, run=0,
                                  micro_batch=2)
        runs = {"trl": real_shape._worker_trl(args), "mopd-full": real_shape._worker_mopd(args, "full_reverse_kl", 4),
                "mopd-full-by-length": real_shape._worker_mopd(args, "full_reverse_kl", 4, by_length=True)}
        for tool, res in runs.items():
            assert len(res["steps"]) == 2, tool
            for step in res["steps"]:
                assert step["seconds"] > 0 and step["cpu_seconds"] > 0
                assert 1 <= step["length_min"] <= step["length_mean"] <= step["length_max"] <= 12, (tool, step)
        mopd = runs["mopd-full"]["steps"][0]
        assert mopd["sampling"] + mopd["loss_forward"] + mopd["backward_and_update"] <= mopd["seconds"]
        assert any(s["length_min"] < s["length_max"] for r in runs.values() for s in r["steps"])  # lengths vary
        for s in runs["mopd-full-by-length"]["steps"]:  # by length the decoder runs over less padding
            assert s["real_tokens"] <= s["decoder_tokens_by_length"] <= s["decoder_tokens_padded"]

        point = lambda x, trl_rss: {"shape": {"vocab": x, "batch": 4}, "median": {  # noqa: E731
            "trl": {"step_s": 1.0, "peak_rss_mib": trl_rss}, "mopd": {"step_s": 0.5, "peak_rss_mib": 100.0}}}
        real_shape.plot({"vocab": [point(64, 300.0), point(128, None)]}, tmp_path / "curves.png")
        assert (tmp_path / "curves.png").stat().st_size > 0
    finally:
        sys.modules.pop("real_shape", None)


def test_real_shape_run_benchmark_runs_mopd_run_and_trl_lean_at_a_miniature_shape(monkeypatch, tmp_path) -> None:
    """benchmarks/real_shape_run.py at a miniature shape: `mopd run` on its recipe at the defaults (the step times
    and their split from metrics.jsonl, the `auto` choice from stage.json) and TRL with its lean settings."""
    pytest.importorskip("trl")
    monkeypatch.syspath_prepend(str(BENCH))
    try:
        bench = importlib.import_module("real_shape_run")
        bench.build(tmp_path, vocab=300, n_teachers=1, student_hidden=16, teacher_hidden=32, eos_norm=0.0)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
        for name in ("student", "teacher0"):
            tok.save_pretrained(tmp_path / name)
        args = argparse.Namespace(models=tmp_path, vocab=300, batch=4, completion=6, steps=2, run=0, threads=1)
        mopd = bench._worker_mopd_run(args, {})
        assert len(mopd["steps"]) == 2 and all(s["seconds"] > 0 for s in mopd["steps"])  # the warm-up step left out
        assert set(mopd["split"]) == {"time/sampling_s", "time/teachers_s", "time/learner_s", "time/update_s"}
        assert mopd["sizing"]["chosen"] and mopd["sizing"]["micro_batch_size"] is None  # tiny: the whole batch
        assert mopd["length_mean"] == 6  # no EOS bias: every completion runs to its limit
        args.lean = True
        lean = bench._worker_trl(args)
        assert len(lean["steps"]) == 2 and all(s["seconds"] > 0 for s in lean["steps"])
    finally:
        for name in ("real_shape_run", "real_shape"):
            sys.modules.pop(name, None)


def test_real_model_trl_benchmark_runs_both_tools_through_their_own_entry_points(monkeypatch, tmp_path) -> None:
    """benchmarks/real_model_trl.py on its tiny stand-in model: TRL's DistillationTrainer (given directories, at
    its defaults) and a one-stage mopd recipe run by `run_stage` train on the same prompts, every completion
    exactly `new_tokens` long (EOS suppressed in both), each step split into phases; the patches go away."""
    pytest.importorskip("trl")
    import mopd.sampling.sampler as sampler_mod
    import mopd.stages.mopd as stage_mod
    import mopd.stages.rl as rl_mod
    from mopd.teachers.panel import TeacherPanel

    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("real_model_trl")
    setup, workers = importlib.import_module("_real_model_setup"), importlib.import_module("_real_model_workers")
    originals = (sampler_mod.next_tokens, sampler_mod._sample, rl_mod.rollout, stage_mod.policy_step_fn,
                 TeacherPanel._teacher_hidden)
    try:
        student = setup.build_tiny(tmp_path / "student")
        teacher = setup.perturbed_teacher(student, tmp_path / "teacher")
        a = argparse.Namespace(student=student, teacher=teacher, run=0, warmup=1, steps=2, batch=4, new_tokens=5)
        drawn = setup.draw_prompts(setup.write_recipe(tmp_path / "draw.yaml", a), tmp_path / "draw")
        assert [len(step) for step in drawn["steps"]] == [4, 4, 4]
        base = {**vars(a), "student": str(student), "teacher": str(teacher), "prompts": drawn["steps"],
                "eos_ids": setup.eos_ids(student), "threads": 1}
        runs = {}
        for tool in ("trl", "mopd", "mopd-full[logit_chunk=2,micro_batch_size=2]"):
            kind, _, settings = bench.parse_tool(tool)
            work = tmp_path / f"work-{len(runs)}"
            spec = {**base, "kind": kind, "settings": settings, "workdir": str(work)}
            runs[tool] = (workers._worker_trl if kind == "trl" else workers._worker_mopd)(spec)
        assert (sampler_mod.next_tokens, sampler_mod._sample, rl_mod.rollout, stage_mod.policy_step_fn,
                TeacherPanel._teacher_hidden) == originals
        for tool, res in runs.items():
            assert len(res["steps"]) == 2 and len(res["warmup_steps"]) == 1, tool
            for step in res["steps"]:
                assert step["length_min"] == step["length_max"] == 5, (tool, step)  # no early EOS
                phases = [step[p] for p in ("sampling", "reward", "teacher") if p in step]
                assert all(p > 0 for p in phases) and sum(phases) < step["seconds"], (tool, step)
                assert step["update"] > 0
            res.update(workers.step_summary(res["steps"], a.batch), peak_rss_mib=500.0)
        assert runs["trl"]["resolved"]["bf16"] and runs["trl"]["resolved"]["gradient_checkpointing"]  # its defaults
        assert runs["mopd"]["resolved"] == {"objective": "sampled", "dtype": "torch.float32",
                                            "weights_dtype": "torch.float32", "logit_chunk": "auto",
                                            "micro_batch_size": "auto", "micro_batch_by_length": "auto",
                                            "teacher_shared_prefill": "auto", "grad_clip": 1.0}
        assert runs["mopd-full[logit_chunk=2,micro_batch_size=2]"]["resolved"]["micro_batch_size"] == 2

        summary = bench.summarize({t: [r] for t, r in runs.items()})
        assert summary["best"] == {"trl": "trl", "sampled": "mopd",
                                   "full_reverse_kl": "mopd-full[logit_chunk=2,micro_batch_size=2]"}
        assert set(summary["headline"]) == {"defaults/sampled", "best/sampled", "best/full_reverse_kl"}
        assert "| `trl` (best) | defaults |" in bench.markdown(summary)
    finally:
        for name in ("real_model_trl", "_real_model_setup", "_real_model_workers", "_common"):
            sys.modules.pop(name, None)


def test_objectives_grid_runs_each_objective_at_each_setting_and_names_the_best(monkeypatch, tmp_path) -> None:
    import json

    from .conftest import MINI_RECIPE

    monkeypatch.syspath_prepend(str(BENCH))
    objectives = importlib.import_module("objectives")
    try:
        recipe = tmp_path / "mini.yaml"
        recipe.write_text(MINI_RECIPE)
        out, js = tmp_path / "out", tmp_path / "obj.json"
        monkeypatch.setattr(sys, "argv", ["objectives.py", "--recipe", str(recipe), "--out", str(out), "--json",
                                          str(js), "--objectives", "sampled,jsd", "--lrs", "1e-3,3e-3",
                                          "--sampled-temperatures", "0.5,1"])
        objectives.main()
    finally:
        sys.modules.pop("objectives", None)  # the module object stays bound here, for best_per_objective
    data = json.loads(js.read_text())
    points = {(r["objective"], r["lr"], r["temperature"]) for r in data["rows"]}
    assert points == {("sampled", lr, t) for lr in (1e-3, 3e-3) for t in (0.5, 1.0)} | {
        ("jsd", lr, 1.0) for lr in (1e-3, 3e-3)}  # the mini student samples at temperature 1
    assert all(r["status"] == "ran" for r in data["rows"])
    for r in data["rows"]:  # each point is its own stage with exactly its settings
        lineage = json.loads((out / r["stage"] / "final" / "mopd.json").read_text())
        assert (lineage["settings"]["lr"], lineage["settings"]["temperature"]) == (r["lr"], r["temperature"])
        assert lineage["settings"]["objective"] == r["objective"]
    assert "Each objective at its best setting:" in data["table_markdown"]
    rows = [{"objective": "sampled", "normalized_score": s, "n": i} for i, s in enumerate((0.2, None, 0.7, 0.5))]
    rows += [{"objective": "jsd", "normalized_score": None, "n": 9}]
    assert [r["n"] for r in objectives.best_per_objective(rows)] == [2, 9]


def test_check_behaviour_drops_a_setting_a_newer_schema_added_even_inside_a_block(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH.parent / "scripts"))
    check = importlib.import_module("check_behaviour")
    try:
        old = {"settings": {"lr": 1e-3, "preflight": {"kl_warn": 0.1}}}
        new = {"settings": {"lr": 1e-3, "preflight": {"kl_warn": 0.1, "min_teacher_gain": None}, "extra": 1}}
        assert check._drop_one_sided_settings(old, new) == ["extra", "preflight.min_teacher_gain"]
        assert old == new
        changed = {"settings": {"lr": 3e-3, "preflight": {"kl_warn": 0.1}}}
        assert check._drop_one_sided_settings(changed, new) == [] and changed != new  # a changed value stays
        report = check.Report()  # a file that is the same but for an added setting is not a difference
        report.line("a", "same (settings on one side only: extra)")
        report.line("b", "DIFFERS: lr")
        assert (report.compared, report.differing) == (2, 1)
    finally:
        sys.modules.pop("check_behaviour", None)
