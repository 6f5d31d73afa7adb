"""offpolicy_ft on models with a chat template (issue 33): a teacher samples each trace from the prompt the
student's SFT step trains on (the stage's rendering), and the SFT targets are the sampled completion tokens, then
EOS. The character recipes hid this: with no template every rendering is the raw one."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import mopd.learner.rollout as rollout_mod
from mopd.envs.base import ALPHABET
from mopd.execution.resolve import resolve_stage
from mopd.learner.supervised import supervised_batch
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.identity import stage_identities
from mopd.recipe.load import load_recipe
from mopd.stages import baselines

# a ChatML-like template; its characters are in the tokenizers below, so every rendering is exact
CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
TINY = TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32)


def _checkpoint(path: Path, alphabet: str, seed: int) -> Path:
    tok = build_char_tokenizer(alphabet)
    tok.chat_template = CHAT
    build_tiny_model(TINY, len(tok), tok, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _traces_and_sft_rows(tmp_path: Path, monkeypatch, teacher: Path, chat_template: str):
    """One offpolicy_ft step of a student with a chat template: (the stage, the teacher's sampled batch, the
    SFT step's (ids, targets) rows), both recorded from the functions the stage calls."""
    student = _checkpoint(tmp_path / "student", ALPHABET + "<>\n", seed=0)
    (tmp_path / "r.yaml").write_text(textwrap.dedent(f"""\
        name: chat_offpolicy
        seed: 0
        chat_template: {chat_template}
        domains: [reversal]
        eval: {{size: 2, max_new_tokens: 4}}
        stages:
          traces:
            kind: offpolicy_ft
            init: {student}
            teachers: {{reversal: {teacher}}}
            steps: 1
            batch_size: 3
            max_new_tokens: 6
        """))
    loaded = load_recipe(tmp_path / "r.yaml")
    ctx = resolve_stage(loaded, "traces", tmp_path / "out", stage_identities(loaded))
    seen: dict = {}
    sample = rollout_mod.sample

    def record_sample(model, tokenizer, prompts, **kw):
        seen["batch"] = sample(model, tokenizer, prompts, **kw)
        seen["sampler_tokenizer"] = tokenizer
        return seen["batch"]

    def record_sft(model, tokenizer, traces, *, loss_on_prompt, prompt_format, **kw):
        ids, attn, target = supervised_batch(tokenizer, traces, loss_on_prompt=loss_on_prompt,
                                             prompt_format=prompt_format)
        seen["sft"] = [(i[a == 1].tolist(), t[a == 1].tolist()) for i, a, t in zip(ids, attn, target, strict=True)]
        seen["traces"] = traces
        return torch.zeros(()), {}

    monkeypatch.setattr(rollout_mod, "sample", record_sample)
    monkeypatch.setattr(baselines, "supervised_loss", record_sft)
    torch.manual_seed(0)
    baselines.offpolicy_loss_fn(ctx)(build_tiny_model(TINY, len(ctx.tokenizer), ctx.tokenizer, seed=0), 0)
    return ctx, seen["batch"], seen["sft"], seen


@pytest.mark.parametrize("chat_template", ["auto", "none"])
def test_teacher_traces_answer_the_prompt_ids_the_student_trains_on(tmp_path, monkeypatch, chat_template) -> None:
    teacher = _checkpoint(tmp_path / "teacher", ALPHABET + "<>\n", seed=1)  # the student's vocabulary
    ctx, batch, sft, _ = _traces_and_sft_rows(tmp_path, monkeypatch, teacher, chat_template)
    assert ctx.prompt_format.chat_template == (chat_template == "auto")
    P, eos = batch.first_completion_column, ctx.tokenizer.eos_token_id
    assert batch.size == len(sft) == 3  # verified_only is off: every trace is kept, in the order sampled
    for b, (ids, target) in enumerate(sft):
        prompt = batch.prompts[b]
        sampled_prompt = batch.input_ids_B_T[b, :P][batch.attention_mask_B_T[b, :P] == 1].tolist()
        rendered = ctx.prompt_format.token_ids(ctx.tokenizer, prompt)
        if chat_template == "auto":
            assert ctx.tokenizer.decode(rendered) == f"<user>{prompt}\n<assistant>"
        # the prompt the teacher answered is the prompt the SFT step conditions on (no target on it)
        assert sampled_prompt == rendered == [i for i, t in zip(ids, target, strict=True) if not t]
        # the targets are the completion tokens exactly as sampled, ended by EOS (appended to a cut trace)
        completion = batch.input_ids_B_T[b, P:][batch.completion_mask_B_T[b, P:] == 1].tolist()
        expect = completion if completion[-1:] == [eos] else [*completion, eos]
        assert [i for i, t in zip(ids, target, strict=True) if t] == expect


def test_a_teacher_of_another_vocabulary_samples_through_its_own_chat_template(tmp_path, monkeypatch) -> None:
    """Traces of a teacher with another tokenizer are text: it renders the prompt with its own template (the
    recipe's `chat_template: auto`), and the student trains on that text under its own rendering."""
    teacher = _checkpoint(tmp_path / "teacher", ALPHABET + "<>\n!", seed=1)  # one character more: other ids
    ctx, batch, sft, seen = _traces_and_sft_rows(tmp_path, monkeypatch, teacher, "auto")
    tok = seen["sampler_tokenizer"]
    assert len(tok) == len(ctx.tokenizer) + 1
    P = batch.first_completion_column
    for b, (ids, target) in enumerate(sft):
        sampled_prompt = batch.input_ids_B_T[b, :P][batch.attention_mask_B_T[b, :P] == 1].tolist()
        assert tok.decode(sampled_prompt) == f"<user>{batch.prompts[b]}\n<assistant>"
        assert [i for i, t in zip(ids, target, strict=True) if not t] == ctx.prompt_format.token_ids(
            ctx.tokenizer, batch.prompts[b])
        assert seen["traces"][b].answer == batch.completions[b]
