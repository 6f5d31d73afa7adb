"""The speed benchmarks' own arithmetic: the FLOP split of a step by phase that docs/BENCHMARKS.md reports."""

from __future__ import annotations

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
