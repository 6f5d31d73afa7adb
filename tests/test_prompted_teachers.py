"""Prompted teachers (context distillation): a teacher that reads its own system prompt and examples before the
student's completion scores exactly what that model gives the completion after that prompt, whether it scores in
process, through a remote backend, or in the preflight; and the `prompted` stage writes a teacher checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mopd.core.batch import tail_aligned, with_prompts
from mopd.core.logprobs import token_logprobs
from mopd.envs import ALPHABET
from mopd.models.forward import sequence_logits
from mopd.models.prompting import PromptContext, PromptFormat
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling.sampler import sample
from mopd.teachers.panel import TeacherPanel
from mopd.teachers.preflight import RolloutSettings, initial_reverse_kl, student_rollouts
from mopd.teachers.prompted import PromptedRemote, reprompter
from mopd.teachers.remote import MixedPanel

from .rounding import U64, decoder_path_terms, gamma

CONTEXT = PromptContext("add the numbers", (("1+2=", "3"), ("4+4=", "8")))
CFG = TinyModelConfig(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64, max_positions=96)
# Float32 forward passes of one row alone and inside a padded batch differ in summation order only (other kernels
# for other shapes, by CPU): for the 2-layer, 32-wide CFG with rows of <= 64 positions and 47 tokens, two paths
# are within 4 gamma(N) S of each other (tests/rounding.py; N = 749 terms along a logprob's path), S the largest
# |logit|, which `_logit_scale` checks is below 10: 1.8e-3. A shifted position or a prompt the teacher did not see
# changes a logprob by O(0.1 - 1).
ATOL = 4 * gamma(decoder_path_terms(CFG, 64, len(build_char_tokenizer(ALPHABET)))) * 10


def _logit_scale(models, *batches) -> float:
    with torch.no_grad():
        return max(float(sequence_logits(m, b.input_ids_B_T, b.attention_mask_B_T).abs().max())
                   for m in models for b in batches)


def _setup():
    tok = build_char_tokenizer(ALPHABET)
    student, plain, prompted = (build_tiny_model(CFG, len(tok), tok, seed=s).eval() for s in range(3))
    prompts = ["1+2=", "rev:abcdefg=", "33+4=", "sort:zyx="] * 2
    domains = ["add", "rev", "add", "rev"] * 2
    batch = sample(student, tok, prompts, max_new_tokens=5, generator=torch.Generator().manual_seed(0),
                   domains=domains)
    seen = reprompter(tok, PromptFormat().with_context(CONTEXT))(batch)  # what the prompted teacher reads
    assert seen.input_ids_B_T.shape[1] <= 64 and _logit_scale((student, plain, prompted), batch, seen) < 10  # ATOL's
    return tok, batch, {"plain": plain, "prompted": prompted}


def _row_logprobs(model, tok, fmt: PromptFormat, prompt: str, completion_ids: list[int]) -> torch.Tensor:
    """log pi(y_t) of each completion token after `fmt`'s rendering of `prompt`, one row alone (no padding)."""
    ids = torch.tensor([fmt.token_ids(tok, prompt) + completion_ids])
    lp = token_logprobs(sequence_logits(model, ids, torch.ones_like(ids)), ids)[0]
    return lp[len(ids[0]) - len(completion_ids):]


def _completion(batch, i: int) -> list[int]:
    keep = batch.completion_mask_B_T[i] > 0
    return batch.input_ids_B_T[i][keep].tolist()


def test_a_prompted_teacher_scores_the_completion_after_its_own_prompt():
    tok, batch, models = _setup()
    fmt = PromptFormat().with_context(CONTEXT)
    panel = TeacherPanel(models=models, teacher_of_domain={"add": "prompted", "rev": "plain"},
                         reprompt={"prompted": reprompter(tok, fmt)})
    names = panel.route(batch)
    got = panel.sampled_logprobs(batch, names)
    for i, name in enumerate(names):
        want = _row_logprobs(models[name], tok, fmt if name == "prompted" else PromptFormat(), batch.prompts[i],
                             _completion(batch, i))
        torch.testing.assert_close(got[i][batch.completion_mask_B_T[i] > 0], want, atol=ATOL, rtol=0)
    # the prompt really reached the teacher: without it the prompted rows score otherwise
    bare = TeacherPanel(models=models, teacher_of_domain=panel.teacher_of_domain).sampled_logprobs(batch, names)
    rows = torch.tensor([n == "prompted" for n in names])
    assert (bare[rows] - got[rows]).abs().max() > 1e-2


def test_every_score_kind_lines_up_with_the_students_batch():
    tok, batch, models = _setup()
    fmt = PromptFormat().with_context(CONTEXT)
    panel = TeacherPanel(models=models, teacher_of_domain={"add": "prompted", "rev": "plain"},
                         reprompt={"prompted": reprompter(tok, fmt)}, logit_chunk=2)
    names = panel.route(batch)
    T = batch.input_ids_B_T.shape[1]
    window = T - batch.first_completion_column
    top_lp, _, sampled = panel.topk(batch, names, 3, window)
    full = panel.full_logits(batch, names, window)
    assert top_lp.shape[:2] == full.shape[:2] == (batch.size, window)
    torch.testing.assert_close(sampled, panel.sampled_logprobs(batch, names), atol=ATOL, rtol=0)
    # the top-1 logprob of each completion position is the max of the full distribution there
    live = batch.completion_mask_B_T[:, T - window:] > 0
    torch.testing.assert_close(top_lp[..., 0][live], full.log_softmax(-1).max(-1).values[live], atol=ATOL, rtol=0)


class _Remote:
    """A remote teacher that is an in-process panel of one model (what a Ray actor runs)."""

    def __init__(self, model):
        self.panel = TeacherPanel(models={"t": model}, teacher_of_domain={})

    def sampled(self, batch):
        return lambda: self.panel.sampled_logprobs(batch, ["t"] * batch.size)

    def topk(self, batch, k, window):
        return lambda: self.panel.topk(batch, ["t"] * batch.size, k, window)

    def logits(self, batch, keep):
        return lambda: self.panel.logit_blocks(batch, ["t"] * batch.size, keep)(0, keep)


def test_a_remote_prompted_teacher_gives_the_in_process_scores():
    tok, batch, models = _setup()
    fmt = PromptFormat().with_context(CONTEXT)
    route = {"add": "prompted", "rev": "plain"}
    local = TeacherPanel(models=models, teacher_of_domain=route, reprompt={"prompted": reprompter(tok, fmt)})
    mixed = MixedPanel(local=TeacherPanel(models={"plain": models["plain"]}, teacher_of_domain=route),
                       remote={"prompted": PromptedRemote(_Remote(models["prompted"]), reprompter(tok, fmt))},
                       teacher_of_domain=route)
    names = local.route(batch)
    torch.testing.assert_close(mixed.sampled_logprobs(batch, names), local.sampled_logprobs(batch, names),
                               atol=ATOL, rtol=0)
    window = batch.input_ids_B_T.shape[1] - batch.first_completion_column
    for a, b in zip(mixed.topk(batch, names, 4, window)[::2], local.topk(batch, names, 4, window)[::2], strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    keep = window + 1
    live = batch.completion_mask_B_T[:, -window:] > 0
    got = mixed.logit_blocks(batch, names, keep)(0, keep)[:, :-1].log_softmax(-1)[live]
    want = local.logit_blocks(batch, names, keep)(0, keep)[:, :-1].log_softmax(-1)[live]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_the_preflight_kl_of_a_prompted_teacher_is_taken_after_its_prompt():
    tok, _, models = _setup()
    fmt = PromptFormat().with_context(CONTEXT)
    settings = RolloutSettings(prompts=4, max_new_tokens=4, temperature=1.0, top_p=1.0)
    prompts = ["1+2=", "5+6=", "7+1=", "2+2="]
    # in float64: the prompt moves this KL by only ~2.5e-4, which float32 rounding of the two paths (2 ATOL) could
    # hide; in float64 they are within 2 x 4 gamma(N, U64) S of each other (~7e-12), and the exact KL is float64
    student, teacher = models["plain"].double(), models["prompted"].double()
    kl_tol = 2 * 4 * gamma(decoder_path_terms(CFG, 64, len(tok)), U64) * 10
    got, tokens = initial_reverse_kl(student, teacher, tok, prompts, settings, torch.Generator().manual_seed(0),
                                     teacher_view=reprompter(tok, fmt))
    # exact reference, one row at a time: the same rollouts, each completion position's full KL
    batch = student_rollouts(student, tok, prompts, settings, torch.Generator().manual_seed(0))
    total, n = 0.0, 0
    torch.set_grad_enabled(False)
    for i, p in enumerate(prompts):
        y = _completion(batch, i)
        s_ids = torch.tensor([PromptFormat().token_ids(tok, p) + y])
        t_ids = torch.tensor([fmt.token_ids(tok, p) + y])
        s_lp = sequence_logits(student, s_ids, torch.ones_like(s_ids))[0, -len(y) - 1:-1].double().log_softmax(-1)
        t_lp = sequence_logits(teacher, t_ids, torch.ones_like(t_ids))[0, -len(y) - 1:-1].double().log_softmax(-1)
        total += float((s_lp.exp() * (s_lp - t_lp)).sum())
        n += len(y)
    torch.set_grad_enabled(True)
    assert tokens == n
    # a KL term sum_v p_v (log p_v - log q_v) moves by at most the two logprobs' rounding
    assert got == pytest.approx(total / n, abs=kl_tol)
    bare, _ = initial_reverse_kl(student, teacher, tok, prompts, settings, torch.Generator().manual_seed(0))
    assert bare != pytest.approx(got, abs=kl_tol)  # the prompt reached the teacher


def test_with_prompts_keeps_the_completion_columns():
    tok, batch, _ = _setup()
    fmt = PromptFormat().with_context(CONTEXT)
    seen = reprompter(tok, fmt)(batch)
    c = batch.input_ids_B_T.shape[1] - batch.first_completion_column
    assert torch.equal(seen.input_ids_B_T[:, -c:], batch.input_ids_B_T[:, -c:])
    assert torch.equal(seen.completion_mask_B_T[:, -c:], batch.completion_mask_B_T[:, -c:])
    assert seen.completion_mask_B_T[:, :-c].sum() == 0
    for i, p in enumerate(batch.prompts):
        real = seen.input_ids_B_T[i, :-c][seen.attention_mask_B_T[i, :-c] > 0].tolist()
        assert real == fmt.token_ids(tok, p)
    x = torch.arange(6.0).view(1, 6)
    assert tail_aligned(x, 4).tolist() == [[2.0, 3.0, 4.0, 5.0]]
    assert tail_aligned(x, 8).tolist() == [[0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]
    assert with_prompts(batch, [[1]] * batch.size, 0).input_ids_B_T.shape[1] == c + 1


def test_chat_rendering_puts_the_system_prompt_and_examples_as_earlier_turns():
    calls = []

    class Tok:
        bos_token_id = None

        def apply_chat_template(self, messages, **kw):
            calls.append(messages)
            return [0]

    PromptFormat(chat_template=True).with_context(CONTEXT).token_ids(Tok(), "9+9=")
    assert calls[0] == [{"role": "system", "content": "add the numbers"},
                        {"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"},
                        {"role": "user", "content": "4+4="}, {"role": "assistant", "content": "8"},
                        {"role": "user", "content": "9+9="}]


PROMPTED_RECIPE = """\
name: pt
seed: 0
domains: [addition, reversal]
eval: {size: 8, max_new_tokens: 6}
stages:
  base:
    kind: pretrain
    model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64, max_positions: 96}
    steps: 4
    batch_size: 8
  t_add:
    kind: prompted
    init: base
    system: "SYSTEM"
    examples: [{prompt: "1+2=", answer: "3"}, {prompt: "4+4=", answer: "8"}]
  student:
    kind: mopd
    init: base
    teachers: {addition: t_add}
    steps: 2
    batch_size: 4
    group_size: 2
"""


def test_a_prompted_stage_is_a_teacher_checkpoint_with_its_prompt(tmp_path: Path):
    from mopd.core.errors import RecipeError
    from mopd.execution.runner import run_recipe
    from mopd.recipe.identity import stage_identities
    from mopd.recipe.load import load_recipe

    recipe = tmp_path / "p.yaml"
    recipe.write_text(PROMPTED_RECIPE.replace("SYSTEM", "add the numbers"))
    run_recipe(load_recipe(recipe), tmp_path / "run")
    final = tmp_path / "run" / "t_add" / "final"
    assert json.loads((final / "teacher_prompt.json").read_text())["system"] == "add the numbers"
    lineage = json.loads((final / "mopd.json").read_text())
    assert "teacher_prompt.json" in lineage["files"]  # sealed with the weights
    assert set(lineage["metrics"]["eval"]) == {"addition", "reversal"}
    pre = json.loads((tmp_path / "run" / "student" / "preflight.json").read_text())
    assert pre["teachers"]["t_add"]["prompt_prefix_tokens"] > 10
    # the prompt is part of the teacher's identity, and so of the student's
    other = tmp_path / "q.yaml"
    other.write_text(PROMPTED_RECIPE.replace("SYSTEM", "sum them"))
    a, b = stage_identities(load_recipe(recipe)), stage_identities(load_recipe(other))
    assert a["base"] == b["base"] and a["t_add"] != b["t_add"] and a["student"] != b["student"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(PROMPTED_RECIPE.replace('    system: "SYSTEM"\n    examples: [{prompt: "1+2=", answer: "3"}, '
                                           '{prompt: "4+4=", answer: "8"}]\n', ""))
    with pytest.raises(RecipeError, match="t_add.*needs a `system` prompt or `examples`"):
        load_recipe(bad)
