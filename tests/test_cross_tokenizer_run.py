"""`mopd run` of a tiny recipe whose MOPD students distil from teachers of other tokenizers (issue 37, item 4): a
mixed panel (a teacher of the student's tokenizer beside three of others) and a BPE student of a character
teacher. preflight.json's `cross_tokenizer` block and every step's `xtok/aligned_token_frac` equal what the
sampled rows' text says (tests/xtok_oracle.py), and a teacher that can write none of the student's text is a
warning line, not a silent KL of 0."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from mopd.cli import app
from mopd.envs import ALPHABET
from mopd.models.checkpoint import load_tokenizer
from mopd.models.tokenizer import build_char_tokenizer
from mopd.stages import rl as rl_module
from mopd.teachers.cross_tokenizer import ForeignTeacher

from .xtok_oracle import batch_coverage, expected_report
from .xtok_setup import bpe_tokenizer, save_tiny

RECIPE = """\
name: xtok
seed: 0
domains: [addition, reversal, sorting, shift]
eval: {{size: 2, max_new_tokens: 6}}
stages:
  student:
    kind: mopd
    init: {root}/student
    teachers:
      addition: {{stage: {root}/t_noqz, cross_tokenizer: true}}
      reversal: {{stage: {root}/t_bpe, cross_tokenizer: true}}
      sorting: {root}/t_char
      shift: {{stage: {root}/t_upper, cross_tokenizer: true}}
    steps: 3
    batch_size: 8
    max_new_tokens: 8
    preflight: {{prompts: 4}}
  student_bpe:
    kind: mopd
    init: {root}/student_bpe
    domains: [reversal]
    teachers: {{reversal: {{stage: {root}/t_char, cross_tokenizer: true}}}}
    steps: 2
    batch_size: 4
    max_new_tokens: 8
    preflight: {{prompts: 4}}
"""


def write_checkpoints(root: Path) -> dict[str, Path]:
    """Untrained tiny models (their samples are varied text): students of characters and of the BPE; teachers of
    characters, of a BPE of 512 tokens (its merges cover most pairs of letters, so a character student's random
    text has chunks of several of its tokens), of characters without q and z (rows that use them do not align),
    and of upper-case letters only (nothing the students write aligns but their special tokens)."""
    char = build_char_tokenizer(ALPHABET)
    toks = {"student": char, "student_bpe": bpe_tokenizer(), "t_char": char, "t_bpe": bpe_tokenizer(512),
            "t_noqz": build_char_tokenizer(ALPHABET.replace("q", "").replace("z", "")),
            "t_upper": build_char_tokenizer("ABCDEFGHIJ")}
    return {name: save_tiny(root / name, tok, seed, name) for seed, (name, tok) in enumerate(toks.items())}


def test_mopd_run_reports_the_alignment_of_what_it_scored(tmp_path, monkeypatch):
    dirs = write_checkpoints(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(root=tmp_path))
    previews, steps = [], []  # what the preflight's alignment report and each training step saw

    real_report = ForeignTeacher.alignment_report

    def alignment_report(self, batch):
        out = real_report(self, batch)
        previews.append((self.cross.teacher_tok.name_or_path, batch, out))
        return out

    real_loss = rl_module.policy_loss

    def policy_loss(model, batch, cfg, **kw):
        steps.append(("student_bpe" if model.config.vocab_size == len(bpe_tokenizer()) else "student", batch))
        return real_loss(model, batch, cfg, **kw)

    monkeypatch.setattr(ForeignTeacher, "alignment_report", alignment_report)
    monkeypatch.setattr(rl_module, "policy_loss", policy_loss)
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    char = build_char_tokenizer(ALPHABET)

    # the teacher of upper-case letters: one warning line, naming it and why
    upper = [line for line in res.output.splitlines() if "t_upper' aligns none" in line]
    assert len(upper) == 1 and "tokenizer can write the domains' characters" in upper[0]

    # preflight.json: per cross-tokenizer teacher, the block equals the text's own account of its rows
    teachers = {"student": {"addition": "t_noqz", "reversal": "t_bpe", "sorting": "t_char", "shift": "t_upper"},
                "student_bpe": {"reversal": "t_char"}}
    student_toks = {"student": char, "student_bpe": load_tokenizer(dirs["student_bpe"])}
    seen = {}
    for stage, routes in teachers.items():
        pre = json.loads((out / stage / "preflight.json").read_text())
        for domain, name in routes.items():
            entry = pre["teachers"][str(dirs[name])]
            assert entry["domains"] == [domain]
            if stage == "student" and name == "t_char":  # the student's own tokenizer: no alignment to report
                assert "cross_tokenizer" not in entry and "estimate" not in entry
                continue
            [(batch, got)] = [(b, o) for t, b, o in previews if Path(t) == dirs[name]]  # once per teacher
            assert got == entry["cross_tokenizer"]
            want = batch_coverage(batch, student_toks[stage], [load_tokenizer(dirs[name])] * batch.size)
            assert got == expected_report(want, student_toks[stage], load_tokenizer(dirs[name])), (stage, name)
            assert entry["tokens"] == want.chunked_tokens  # the KL estimate averages over the tokens in chunks
            seen[(stage, name)] = want
    # the run covered what it should: chunks of several student tokens (the BPE's merges read by a character
    # student) and of several teacher tokens (a BPE student read by a character teacher), text that does not align
    assert max(int(k) for k in seen["student", "t_bpe"].describe()["student_tokens_per_chunk"]) > 1
    assert max(int(k) for k in seen["student_bpe", "t_char"].describe()["teacher_tokens_per_chunk"]) > 1
    assert seen["student", "t_upper"].describe()["aligned_text_frac"] == 0.0

    # metrics.jsonl: each step's share of completion tokens in aligned chunks, over the whole batch (a row of the
    # student's own tokenizer is one chunk a token), is the text's; float32: a ratio of two exact integer sums
    import torch

    rows = {s: [json.loads(x) for x in (out / s / "metrics.jsonl").read_text().splitlines()] for s in teachers}
    train = {s: [r for r in rows[s] if "loss" in r] for s in teachers}
    assert [len(train[s]) for s in teachers] == [3, 2] and len(steps) == 5
    partial = 0
    by_stage = {s: [b for t, b in steps if t == s] for s in teachers}
    for record, (stage, batch) in zip([*train["student"], *train["student_bpe"]],
                                      [(s, b) for s in teachers for b in by_stage[s]], strict=True):
        toks = [None if teachers[stage][d] == "t_char" and stage == "student" else load_tokenizer(
            dirs[teachers[stage][d]]) for d in batch.domains]
        want = batch_coverage(batch, student_toks[stage], toks)
        frac = torch.tensor(float(want.chunked_tokens)) / torch.tensor(float(want.model_tokens))
        assert record["xtok/aligned_token_frac"] == float(frac), (stage, record["step"])
        partial += 0 < want.chunked_tokens < want.model_tokens
    assert partial >= 1  # some step scored rows of which only a part aligns


def test_a_teacher_of_another_tokenizer_without_the_opt_in_is_one_line_at_load(tmp_path):
    """The same recipe with the BPE teacher named plainly: `mopd run` stops at load with exit 2 and one line that
    names the key and the opt-in, and writes nothing."""
    write_checkpoints(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(root=tmp_path).replace(
        f"reversal: {{stage: {tmp_path}/t_bpe, cross_tokenizer: true}}", f"reversal: {tmp_path}/t_bpe"))
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    [line] = [x for x in res.output.splitlines() if x.strip()]
    assert "stages.student.teachers.reversal" in line and "cross_tokenizer: true" in line
    assert not (tmp_path / "out").exists()

