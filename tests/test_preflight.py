"""The teacher-student preflight: refuses a foreign vocabulary, flags a foreign-lineage teacher by its KL."""

from __future__ import annotations

import io
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from mopd.core.errors import StageError
from mopd.envs import ALPHABET
from mopd.execution.runner import run_recipe
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.load import load_recipe
from mopd.teachers.preflight import PreflightError, RolloutSettings, check_tokenizers, initial_reverse_kl

from .conftest import MINI_RECIPE
from .rounding import two_path_logprob_tol

TINY = TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16)

# A same-lineage teacher (SFT continued from the student's own start) and a foreign one (a separate base,
# pretrained from another seed on the same corpus). These KLs come out of 37 AdamW steps, so they are not
# determined to rounding: another CPU's kernels change them (by ~2e-5 here, with MKL and ATen held to AVX2), and
# so, far more, does another seed. Over the recipe's seeds 0-3 the foreign teacher's KL was 0.27-0.40 and the
# same-lineage one's 0.007-0.059: the default kl_warn of 0.1 separates them with a margin on both sides that
# a seed does not close, let alone a CPU.
FOREIGN_RECIPE = textwrap.dedent(
    """\
    name: preflight
    seed: 0
    domains: [addition, reversal]
    eval: {size: 8, max_new_tokens: 8}
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
        steps: 30
        batch_size: 16
        lr: 0.01
      sft: {kind: sft, init: base, steps: 3, batch_size: 12}
      teacher_same: {kind: sft, init: sft, domains: [reversal], steps: 4, batch_size: 12}
      foreign:
        kind: pretrain
        seed: 7
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
        steps: 30
        batch_size: 16
        lr: 0.01
      student:
        kind: mopd
        init: sft
        teachers: {addition: foreign, reversal: teacher_same}
        steps: 1
        batch_size: 4
        preflight: {kl_warn: 0.1, prompts: 16}
    """
)


def test_different_alphabet_is_refused_in_one_line() -> None:
    student, foreign = build_char_tokenizer(ALPHABET), build_char_tokenizer("0123456789+=")
    with pytest.raises(PreflightError) as e:
        check_tokenizers(student, foreign, "stage 'student': teacher 't' (addition)")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("stage 'student': teacher 't' (addition): vocabulary differs")


def test_special_token_mismatch_is_refused_and_chat_template_warned() -> None:
    student = build_char_tokenizer(ALPHABET)
    other = build_char_tokenizer(ALPHABET)
    other.eos_token = "<pad>"  # same vocabulary, but EOS now has another id
    with pytest.raises(PreflightError, match=r"special tokens differ .*eos: student \('<eos>', 2\) vs teacher"):
        check_tokenizers(student, other, "t")
    same = build_char_tokenizer(ALPHABET)
    assert check_tokenizers(student, same, "t") == []
    same.chat_template = "{{ messages }}"
    [warning] = check_tokenizers(student, same, "t")
    assert "chat template differs" in warning


def test_initial_reverse_kl_is_exact_and_zero_for_the_student_itself() -> None:
    tok = build_char_tokenizer(ALPHABET)
    student = build_tiny_model(TINY, len(tok), tok, 0).eval()
    teacher = build_tiny_model(TINY, len(tok), tok, 1).eval()
    settings = RolloutSettings(prompts=3, max_new_tokens=4, temperature=1.0, top_p=1.0)
    prompts = ["add:1+2=", "rev:abc=", "sort:cba="]
    same, n = initial_reverse_kl(student, student, tok, prompts, settings, torch.Generator().manual_seed(0))
    assert same == 0.0 and n > 0
    kl, _ = initial_reverse_kl(student, teacher, tok, prompts, settings, torch.Generator().manual_seed(0))
    # the same rollouts, recomputed by hand: sum_v p (log p - log q) at each completion position
    from mopd.models.forward import sequence_logits
    from mopd.sampling.sampler import sample

    batch = sample(student, tok, prompts, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s_logits = sequence_logits(student, batch.input_ids_B_T, batch.attention_mask_B_T)
        t_logits = sequence_logits(teacher, batch.input_ids_B_T, batch.attention_mask_B_T)
    logp, logq = s_logits[:, :-1].log_softmax(-1), t_logits[:, :-1].log_softmax(-1)
    m = batch.completion_mask_B_T[:, 1:]
    expected = float(((logp.exp() * (logp - logq)).sum(-1) * m).sum() / m.sum())
    tol = _kl_tol(s_logits, t_logits, logp, logq)
    assert kl == pytest.approx(expected, rel=0, abs=tol) and kl > 0
    for rows in (1, 2):  # the exact KL a block of rollouts at a time: the same value
        blocked, n_blocked = initial_reverse_kl(student, teacher, tok, prompts, settings,
                                                torch.Generator().manual_seed(0), rows=rows)
        assert blocked == pytest.approx(expected, rel=0, abs=tol) and n_blocked == int(m.sum())


def _kl_tol(s_logits, t_logits, logp, logq) -> float:
    """Two float32 computations of a token-mean reverse KL over other batch shapes (other kernels, by CPU): each
    logprob within `two_path_logprob_tol` of the other's (tests/rounding.py), so a term sum_v p_v (log p_v -
    log q_v) within twice that plus that times max |log p - log q| (p_v moving by p_v times its logprob's
    error); a KL of the wrong positions or rows is off by O(0.1)."""
    tol = max(two_path_logprob_tol(TINY, s_logits), two_path_logprob_tol(TINY, t_logits))
    return tol * (2 + float((logp - logq).abs().max()))


def test_runner_refuses_a_foreign_vocabulary_before_training(tmp_path: Path) -> None:
    tok = build_char_tokenizer("0123456789+=")
    foreign = tmp_path / "foreign_teacher"
    build_tiny_model(TINY, len(tok), tok, 0).save_pretrained(foreign)
    tok.save_pretrained(foreign)
    data = yaml.safe_load(MINI_RECIPE)
    data["stages"]["student"]["teachers"]["addition"] = str(foreign)
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    # the load-time check would refuse it first; skip it to exercise the runtime guard
    loaded = load_recipe(recipe, check_tokenizers=False)
    with pytest.raises(StageError) as e:  # the local executor's one line per failed stage
        run_recipe(loaded, tmp_path / "out", Console(file=io.StringIO()))
    assert "\n" not in str(e.value)
    assert "stage 'student': teacher" in str(e.value) and "vocabulary differs" in str(e.value)
    assert not (tmp_path / "out" / "student" / "metrics.jsonl").exists()  # no step was taken


@pytest.fixture(scope="module")
def foreign_run(tmp_path_factory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("preflight")
    recipe = d / "preflight.yaml"
    recipe.write_text(FOREIGN_RECIPE)
    buf = io.StringIO()
    run_recipe(load_recipe(recipe), d / "out", Console(file=buf, width=400))
    return d / "out", buf.getvalue()


def test_foreign_teacher_is_flagged_same_lineage_is_not(foreign_run) -> None:
    out, console = foreign_run
    pf = json.loads((out / "student" / "preflight.json").read_text())
    same, foreign = pf["teachers"]["teacher_same"], pf["teachers"]["foreign"]
    assert same["domains"] == ["reversal"] and foreign["domains"] == ["addition"]
    assert foreign["reverse_kl"] > 0.2 > 0.1 > same["reverse_kl"] > 0  # ~0.34 vs ~0.007 (seeds: FOREIGN_RECIPE)
    assert foreign["warn"] and not same["warn"]
    assert len(pf["warnings"]) == 1 and "teacher 'foreign' starts far from the student" in pf["warnings"][0]
    assert "warning: stage 'student': teacher 'foreign'" in console
    md = (out / "report.md").read_text()
    assert "## Teacher preflight" in md
    assert "| student | foreign | addition |" in md and "**WARNING**" in md
    assert "| student | teacher_same | reversal |" in md
    for name in ("routing_share.png", "is_dropped.png", "teacher_nll.png"):
        assert (out / name).stat().st_size > 0


def test_preflight_is_not_repeated_when_the_stage_resumes(foreign_run) -> None:
    out, _ = foreign_run
    path = out / "student" / "preflight.json"
    before = path.read_bytes()
    path.write_text(json.dumps({**json.loads(before), "marker": 1}))
    shutil.rmtree(out / "student" / "final")  # as if interrupted before its final checkpoint: it runs again
    run_recipe(load_recipe(out / "recipe.yaml"), out, Console(file=io.StringIO()))
    assert json.loads(path.read_text())["marker"] == 1


def test_a_tool_domain_teacher_is_measured_on_whole_episodes_over_the_models_tokens() -> None:
    """The preflight of a tool-use domain's teacher plays episodes as training does (observations in the window);
    its KL is the exact full-vocabulary KL at the model's tokens only, recomputed here from the same episodes."""
    import random

    from mopd.core.batch import ROLE_ENV
    from mopd.envs import get_domain
    from mopd.models.forward import sequence_logits
    from mopd.sampling.multi_turn import episode_rows
    from mopd.teachers.preflight import domain_problems, run_preflight, student_rollouts

    tok = build_char_tokenizer(ALPHABET)
    student = build_tiny_model(TINY, len(tok), tok, 0).eval()
    teacher = build_tiny_model(TINY, len(tok), tok, 1).eval()
    lookup = get_domain("tool_lookup")
    settings = RolloutSettings(prompts=4, max_new_tokens=6, temperature=1.0, top_p=1.0)
    seed, no_exclude = 3, {"tool_lookup": frozenset()}
    result = run_preflight(stage="s", student=student, tokenizer=tok, student_tok=tok, teachers={"t": teacher},
                           teacher_toks={"t": tok}, teacher_of_domain={"tool_lookup": "t"}, domains=[lookup],
                           settings=settings, kl_warn=1e9, seed=seed, exclude=no_exclude, warn=lambda _: None)
    # the same episodes, by hand: run_preflight's problem draw and generator for its first teacher
    problems = domain_problems([lookup], 4, random.Random(f"mopd-preflight:{seed}:t"), no_exclude)
    episodes = episode_rows(problems, {"tool_lookup": lookup}, 6)
    batch = student_rollouts(student, tok, [p.prompt for p in problems], settings,
                             torch.Generator().manual_seed(seed * 1_000_003), episodes=episodes)
    # episodes, not single turns: each within the domain's own token budget, not the stage's max_new_tokens (a
    # random student rarely makes a well-formed call, so observations may be absent; where they are, no KL)
    assert batch.roles_B_T is not None and int(batch.completion_mask_B_T.sum(1).max()) > settings.max_new_tokens
    with torch.no_grad():
        s_logits = sequence_logits(student, batch.input_ids_B_T, batch.attention_mask_B_T)
        t_logits = sequence_logits(teacher, batch.input_ids_B_T, batch.attention_mask_B_T)
    logp, logq = s_logits[:, :-1].log_softmax(-1), t_logits[:, :-1].log_softmax(-1)
    m = batch.completion_mask_B_T[:, 1:]  # the model's tokens only: observations carry no KL
    assert not (m.bool() & (batch.roles_B_T[:, 1:] == ROLE_ENV)).any()
    expected = float(((logp.exp() * (logp - logq)).sum(-1) * m).sum() / m.sum())
    got = result["teachers"]["t"]
    assert got["tokens"] == int(m.sum())
    assert got["reverse_kl"] == pytest.approx(expected, rel=0, abs=_kl_tol(s_logits, t_logits, logp, logq))


def _gated_run(foreign_run, tmp_path: Path, margin: float) -> tuple[Path, str]:
    """The foreign run's finished stages plus a MOPD stage gated by `min_teacher_gain: margin` (rerun in a copy)."""
    out = tmp_path / "out"
    shutil.copytree(foreign_run[0], out, symlinks=True)
    data = yaml.safe_load(FOREIGN_RECIPE)
    data["stages"]["gated"] = {**data["stages"]["student"], "preflight": {"kl_warn": 1.0, "prompts": 4,
                                                                         "min_teacher_gain": margin}}
    recipe = tmp_path / "gated.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    buf = io.StringIO()
    run_recipe(load_recipe(recipe), out, Console(file=buf, width=400))
    return out, buf.getvalue()


def _score(stage_dir: Path, domain: str) -> float:
    return json.loads((stage_dir / "final" / "mopd.json").read_text())["metrics"]["eval"][domain]["score"]


def test_teacher_gain_gate_records_the_gains_it_checked(foreign_run, tmp_path: Path) -> None:
    out, _ = _gated_run(foreign_run, tmp_path, margin=-1.0)
    gate = json.loads((out / "gated" / "preflight.json").read_text())["teacher_gain"]
    assert gate["min"] == -1.0 and set(gate["domains"]) == {"addition", "reversal"}
    for domain, teacher in (("addition", "foreign"), ("reversal", "teacher_same")):
        g = gate["domains"][domain]
        assert g["teacher"] == teacher
        assert g["teacher_score"] == _score(out / teacher, domain) and g["start_score"] == _score(out / "sft", domain)
        assert g["gain"] == pytest.approx(g["teacher_score"] - g["start_score"])
    assert (out / "gated" / "final" / "mopd.json").is_file()


def test_teacher_gain_gate_refuses_teachers_that_do_not_beat_the_start(foreign_run, tmp_path: Path) -> None:
    from mopd.core.errors import StageError

    with pytest.raises(StageError) as e:
        _gated_run(foreign_run, tmp_path, margin=2.0)  # scores are in [0, 1]: no teacher can gain 2
    msg = str(e.value)
    assert "\n" not in msg and "stage 'gated'" in msg and "min_teacher_gain 2" in msg
    assert "'foreign' on addition" in msg and "'teacher_same' on reversal" in msg
    assert not (tmp_path / "out" / "gated" / "metrics.jsonl").exists()  # refused before any step
