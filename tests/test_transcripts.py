"""Transcripts (issue 38): a rollout batch cut into turns by who wrote each token, each turn's teacher KL, the
files read back as untrusted input, the rows a logged step keeps, the report's best and worst, `mopd eval --show`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from mopd.core.batch import ROLE_MODEL, ROLE_PROMPT, rollout_batch
from mopd.envs import ALPHABET, get_domain
from mopd.envs.episode import trajectory_ids
from mopd.eval.transcripts import (
    best_and_worst,
    read_transcripts,
    render,
    sampled_rows,
    samples_path,
    transcripts,
    write_transcripts,
)
from mopd.models.prompting import RAW
from mopd.models.tokenizer import build_char_tokenizer


def _batch(tok, rows: list[tuple[str, list[tuple[str, str]]]], domains: list[str]):
    """A rewarded batch of gold trajectories rendered as the multi-turn sampler renders them (prompt, then each
    model turn with its EOS and each observation), left-padded prompts and right-padded windows."""
    rendered = [trajectory_ids(tok, RAW, prompt, segments, None) for prompt, segments in rows]
    starts = [r.index(ROLE_MODEL) for _, r in rendered]
    P, N = max(starts), max(len(ids) - s for (ids, _), s in zip(rendered, starts, strict=True))
    prompt_B_P = torch.full((len(rows), P), tok.pad_token_id)
    pmask_B_P = torch.zeros((len(rows), P), dtype=torch.long)
    ids_B_N = torch.full((len(rows), N), tok.pad_token_id)
    roles_B_N = torch.full((len(rows), N), ROLE_PROMPT)
    for b, ((ids, roles), s) in enumerate(zip(rendered, starts, strict=True)):
        prompt_B_P[b, P - s:], pmask_B_P[b, P - s:] = torch.tensor(ids[:s]), 1
        ids_B_N[b, : len(ids) - s], roles_B_N[b, : len(ids) - s] = torch.tensor(ids[s:]), torch.tensor(roles[s:])
    batch = rollout_batch(prompt_B_P, pmask_B_P, ids_B_N, torch.zeros((len(rows), N)),
                          (roles_B_N == ROLE_MODEL).float(), prompts=[p for p, _ in rows], completions=["", ""],
                          domains=domains, references=["408", "cba"], completion_roles_B_N=roles_B_N)
    return batch.with_rewards(torch.tensor([1.0, 0.25])), P


def test_turns_are_cut_by_who_wrote_each_token_and_carry_their_teacher_kl() -> None:
    tok = build_char_tokenizer(ALPHABET)
    tool_row = ("mul:12*34=", [("model", "mul:12,34"), ("env", "408"), ("model", "408")])
    plain_row = ("rev:abc=", [("model", "cbb")])
    batch, P = _batch(tok, [tool_row, plain_row], ["tool_mul", "reversal"])
    # a per-token KL: 1, 2, 3, ... along each row; the plain row has no teacher (NaN)
    kl_B_T = torch.arange(batch.input_ids_B_T.numel(), dtype=torch.float).reshape(batch.input_ids_B_T.shape)
    kl_B_T[1] = float("nan")
    tool, plain = transcripts(batch, tok, step=7, kind="train", kl_B_T=kl_B_T, extra={"model": "m"})
    assert [(t["role"], t["text"]) for t in tool["turns"]] == [
        ("assistant", "mul:12,34"), ("tool", "408="), ("assistant", "408")]  # the raw format's `=` cue is seen
    assert [t.get("tool_call") for t in tool["turns"]] == [True, None, False]
    roles = batch.roles[0].tolist()
    first_turn = [t for t in range(P, len(roles)) if roles[t] == ROLE_MODEL][: len("mul:12,34") + 1]  # with EOS
    assert tool["turns"][0]["teacher_kl"] == pytest.approx(kl_B_T[0, first_turn].mean().item())
    assert "teacher_kl" not in tool["turns"][1]  # observations are not the model's
    assert tool | {"turns": None} == {"step": 7, "kind": "train", "domain": "tool_mul", "prompt": "mul:12*34=",
                                      "reference": "408", "reward": 1.0, "model": "m", "turns": None}
    assert plain["turns"] == [{"role": "assistant", "text": "cbb", "tool_call": False}]  # NaN: no teacher KL
    assert render(tool).splitlines() == ["[tool_mul] reward 1.000  (reference: 408)", "user: mul:12*34=",
                                         f"assistant: mul:12,34  (tool call, teacher KL "
                                         f"{tool['turns'][0]['teacher_kl']:.3f})",
                                         "tool: 408=", f"assistant: 408  (teacher KL "
                                         f"{tool['turns'][2]['teacher_kl']:.3f})"]


def test_gold_trajectory_of_a_tool_domain_reads_back_as_its_segments() -> None:
    """A domain's own gold trajectory (its demonstration played through its tools) is what the transcript shows."""
    tok = build_char_tokenizer(ALPHABET)
    domain = get_domain("tool_chain")
    problem = domain.eval_set(1, seed=3)[0]
    segments = problem.meta["trajectory"]
    batch, _ = _batch(tok, [(problem.prompt, segments), ("rev:abc=", [("model", "cba")])], ["tool_chain", "reversal"])
    [record] = transcripts(batch, tok, step=0, kind="eval", rows=[0])
    assert [(t["role"], t["text"]) for t in record["turns"]] == [
        ("assistant" if kind == "model" else "tool", text + ("=" if kind == "env" else "")) for kind, text in segments]
    assert sum(t.get("tool_call", False) for t in record["turns"]) == 2  # get, then mul


def test_files_are_written_whole_and_read_back_as_untrusted(tmp_path: Path) -> None:
    path = samples_path(tmp_path / "stage", "eval", 12)
    assert path == tmp_path / "stage" / "samples" / "eval-0000012.jsonl"
    records = [{"domain": "a", "reward": 0.5, "turns": []}, {"domain": "a", "reward": 1.0, "turns": []}]
    write_transcripts(path, records)
    write_transcripts(path, records)  # a redone step rewrites its file: nothing twice
    assert read_transcripts(path) == records and not list(path.parent.glob(".*.tmp"))
    path.write_text(path.read_text() + '{"cut by a kill\n[1, 2]\n{"turns": "not a list"}\n')
    assert read_transcripts(path) == records
    path.write_bytes(b"\xff\xfe")
    assert read_transcripts(path) == [] and read_transcripts(tmp_path / "missing.jsonl") == []


def test_best_and_worst_per_domain_and_the_rows_a_logged_step_keeps() -> None:
    records = [{"domain": d, "reward": r, "turns": [], "i": i}
               for i, (d, r) in enumerate([("a", 0.5), ("a", 1.0), ("b", 0.0), ("a", 0.0), ("a", 1.0)])]
    picked = [(kind, r["i"]) for kind, r in best_and_worst(records)]
    assert picked == [("best", 1), ("worst", 3), ("best", 2)]  # ties: first in file order; b has one record
    assert [(k, r["i"]) for k, r in best_and_worst(records, per_domain=2)] == [
        ("best", 1), ("best", 4), ("worst", 3), ("worst", 0), ("best", 2)]
    domains = ["a", "b", "a", "a", "b", "a"]
    rows = sampled_rows(domains, random.Random("0:samples:4"))
    assert rows == sorted(rows) and [domains[i] for i in rows].count("a") == 2 and [domains[i] for i in rows].count(
        "b") == 2
    assert rows == sampled_rows(domains, random.Random("0:samples:4"))  # seeded: the same rows on a rerun
    assert sampled_rows(["a"], random.Random(0)) == [0]


def test_mopd_eval_show_prints_transcripts_and_out_writes_them(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mopd.cli import app
    from mopd.core.schema.stages import TinyModelConfig
    from mopd.models.checkpoint import save_checkpoint
    from mopd.models.tiny import build_tiny_model

    tok = build_char_tokenizer(ALPHABET)
    cfg = TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32)
    save_checkpoint(tmp_path / "m", build_tiny_model(cfg, len(tok), tok, seed=0), tok, {"stage": "m"})
    out = tmp_path / "scores.json"
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "m"), "--domains", "reversal,tool_mul", "--size", "3",
                                   "--show", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.count("user: rev:") == 2 and res.output.count("user: mul:") == 1  # in turn from each domain
    lines = [json.loads(x) for x in (tmp_path / "scores.transcripts.jsonl").read_text().splitlines()]
    assert [r["domain"] for r in lines] == ["reversal"] * 3 + ["tool_mul"] * 3
    scores = json.loads(out.read_text())["domains"]
    assert sum(r["reward"] for r in lines[:3]) / 3 == pytest.approx(scores["reversal"]["score"])
    bad = CliRunner().invoke(app, ["eval", str(tmp_path / "m"), "--domains", "reversal", "--show", "-1"])
    assert bad.exit_code == 2 and "--show -1" in bad.output


def test_teacher_kl_is_the_students_logprob_minus_the_routed_teachers_on_model_tokens() -> None:
    """`stages.samples.teacher_kl`: log pi_S(y_t) - log pi_T(y_t) at each model token of a row whose domain has a
    teacher (the student's logprobs from its own forward, one row at a time: the same as the whole batch's),
    NaN on observations, prompt, padding and rows without a teacher."""
    from types import SimpleNamespace

    from mopd.core.batch import ROLE_MODEL
    from mopd.core.logprobs import token_logprobs
    from mopd.core.schema.stages import TinyModelConfig
    from mopd.models.forward import sequence_logits
    from mopd.models.tiny import build_tiny_model
    from mopd.stages.samples import teacher_kl

    tok = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32),
                             len(tok), tok, seed=0).eval()
    batch, _ = _batch(tok, [("mul:12*34=", [("model", "mul:12,34"), ("env", "408"), ("model", "408")]),
                            ("rev:abc=", [("model", "cba")])], ["tool_mul", "reversal"])

    class Panel:
        asked: list = []

        def route(self, sub):
            return ["t_mul" for _ in sub.domains]

        def sampled_logprobs(self, sub, names):
            self.asked.append((list(sub.domains), names))
            return torch.full(sub.input_ids_B_T.shape, -2.0) * sub.completion_mask_B_T

        def chunk_ids(self, sub, names):  # the teacher reads the student's tokens
            return None

    panel = Panel()
    ctx = SimpleNamespace(teacher_of_domain={"tool_mul": "t_mul"})  # reversal: a reward-only domain
    steps = []
    kl_B_T = teacher_kl(ctx, lambda step: steps.append(step) or panel)(model, batch, 5)
    assert steps == [5] and panel.asked == [(["tool_mul"], ["t_mul"])]  # only the rows with a teacher are scored
    with torch.no_grad():
        student_B_T = token_logprobs(sequence_logits(model, batch.input_ids_B_T, batch.attention_mask_B_T),
                                     batch.input_ids_B_T)
    model_T = batch.roles[0] == ROLE_MODEL
    torch.testing.assert_close(kl_B_T[0, model_T], student_B_T[0, model_T] + 2.0, rtol=1e-5, atol=1e-5)
    assert kl_B_T[0, ~model_T].isnan().all() and kl_B_T[1].isnan().all()
    assert model.training is False  # left as it was
