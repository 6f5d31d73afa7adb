"""mopd.report: rebuild tables, curves and summary.json from a fake run directory."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from mopd.models.integrity import sealed_lineage
from mopd.report import build_report, normalized_score, recovery

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# final eval scores: stage -> domain -> score (accuracy = score - 0.1)
SCORES = {
    "sft": {"math": 0.2, "code": 0.4},
    "rl_math": {"math": 0.6, "code": 0.35},
    "rl_code": {"math": 0.15, "code": 0.8},
    "mopd": {"math": 0.5, "code": 0.6},
    "mopd_r2": {"math": 0.6, "code": 0.9},
}


def _stage(kind, init, domains, teachers=None, wall=10.0):
    return {
        "kind": kind,
        "init": init,
        "teachers": teachers,
        "domains": domains,
        "identity": "ab12",
        "wall_seconds": wall,
    }


def make_run(root: Path, scores=SCORES, bad_line: bool = False) -> Path:
    teachers = {"math": "rl_math", "code": "rl_code"}
    stages = {
        "sft": _stage("sft", None, ["math", "code"]),
        "rl_math": _stage("rlvr", "sft", ["math"]),
        "rl_code": _stage("rlvr", "sft", ["code"]),
        "mopd": _stage("mopd", "sft", ["math", "code"], teachers),
        "mopd_r2": _stage("mopd", "mopd", ["math", "code"], teachers),
    }
    run = {
        "recipe": "demo",
        "recipe_path": "recipes/demo.yaml",
        "seed": 0,
        "wall_seconds": 301.2,
        "order": list(stages),
        "stages": stages,
        "report": {"start": "sft", "student": "mopd", "teachers": teachers},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.json").write_text(json.dumps(run))
    for name, st in stages.items():
        d = root / name
        (d / "final").mkdir(parents=True)
        lines = []
        for step in range(4):
            row = {
                "step": step,
                "loss": 1.0 / (step + 1),
                "entropy": 0.9 - 0.1 * step,
                "completion_len": 20 + step,
            }
            if st["kind"] in ("rlvr", "mopd"):
                row["reward/mean"] = 0.1 * step
                for dom in st["domains"]:
                    row[f"reward/{dom}"] = 0.1 * step + 0.05
            if st["kind"] == "mopd":
                for t in teachers.values():
                    row[f"mopd/reverse_kl/{t}"] = 0.5 / (step + 1)
                if step == 2:
                    del row["entropy"]  # keys may be missing on some lines
            lines.append(json.dumps(row))
        lines.append(json.dumps({"step": 3, "eval/math": 0.4, "extra": "ignored"}))
        if bad_line:
            lines.insert(1, '{"step": 1, "loss": ')  # truncated line
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        ev = {dom: {"score": s, "accuracy": round(s - 0.1, 3)} for dom, s in scores[name].items()}
        final = {
            "stage": name,
            "kind": st["kind"],
            "identity": "ab12",
            "parents": [],
            "seed": 0,
            "version": "0.1.0",
            "settings": {},
            "metrics": {"eval": ev},
        }
        (d / "final" / "mopd.json").write_text(json.dumps(sealed_lineage(d / "final", final)))
    return root


def test_scores_pure():
    assert recovery(0.2, 0.6, 0.5) == pytest.approx(0.75)
    assert recovery(0.2, 0.6, 0.1) == pytest.approx(-0.25)
    assert recovery(0.4, 0.4, 0.9) is None
    assert recovery(0.4, 0.3, 0.9) is None
    assert recovery(None, 0.6, 0.5) is None
    assert normalized_score([0.5, None, 1.0]) == pytest.approx(0.75)
    assert normalized_score([None]) is None
    assert normalized_score([]) is None


def test_build_report_summary_and_files(tmp_path):
    run = make_run(tmp_path / "run")
    summary = build_report(run)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary
    assert set(summary) == {"recipe", "wall_seconds", "normalized_score", "min_teacher_gain", "domains", "warnings"}
    assert summary["recipe"] == "demo" and summary["wall_seconds"] == 301.2
    assert summary["min_teacher_gain"] == 0.05 and summary["warnings"] == []  # the default; both gains are 0.4
    math_rec = (0.5 - 0.2) / (0.6 - 0.2)  # 0.75
    code_rec = (0.6 - 0.4) / (0.8 - 0.4)  # 0.5
    assert summary["domains"]["math"] == {
        "start": 0.2,
        "teacher": 0.6,
        "student": 0.5,
        "recovery": pytest.approx(math_rec),
    }
    assert summary["domains"]["code"] == {
        "start": 0.4,
        "teacher": 0.8,
        "student": 0.6,
        "recovery": pytest.approx(code_rec),
    }
    assert summary["normalized_score"] == pytest.approx((math_rec + code_rec) / 2)

    md = (run / "report.md").read_text()
    assert md.startswith("# MOPD report: demo (5 min 1 s wall)")
    assert "| domain | start (sft) | teacher | mopd | recovery (mopd) | mopd_r2 | recovery (mopd_r2) |" in md
    assert "| math | 0.200 | 0.600 (rl_math) | 0.500 | 0.750 | 0.600 | 1.000 |" in md
    assert "| code | 0.400 | 0.800 (rl_code) | 0.600 | 0.500 | 0.900 | 1.250 |" in md
    assert "| **normalized score** |  |  |  | **0.625** |  | **1.125** |" in md
    assert "How to read this" in md and "n/a" not in md
    assert "| rl_math | rlvr | sft | — | finished | 10.0 | 0.600 | 0.350 |" in md  # stage table
    assert "| mopd | 0.400 | 0.500 |" in md  # accuracy table
    for name in ("reward.png", "reverse_kl.png", "entropy.png", "completion_len.png"):
        path = run / name
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
        assert f"]({name})" in md
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "rl_math" in page
    assert not list(run.glob(".*.tmp"))  # no temp files left behind


def test_na_recovery_excluded(tmp_path):
    scores = {k: dict(v) for k, v in SCORES.items()}
    scores["rl_code"]["code"] = 0.4  # teacher == start: no gain to recover
    run = make_run(tmp_path / "run", scores)
    summary = build_report(run)
    assert summary["domains"]["code"]["recovery"] is None
    assert summary["domains"]["math"]["recovery"] == pytest.approx(0.75)
    assert summary["normalized_score"] == pytest.approx(0.75)  # mean over defined domains only
    assert "null" in (run / "summary.json").read_text()
    md = (run / "report.md").read_text()
    too_small = "teacher gain too small"
    assert f"| code | 0.400 | 0.400 (rl_code) | 0.600 | {too_small} | 0.900 | {too_small} |" in md
    assert f"**Warning**: {too_small} on `code`: the teacher `rl_code` gained +0.000 over the start" in md
    assert "left out of the normalized score" in md


def _run_with(tmp_path: Path, code_teacher: float, min_gain: float | None = None) -> Path:
    """The fake run with the code teacher's score set (start 0.4), and `report.min_teacher_gain` in run.json."""
    scores = {k: dict(v) for k, v in SCORES.items()}
    scores["rl_code"]["code"] = code_teacher
    run = make_run(tmp_path / f"run-{code_teacher}-{min_gain}", scores)
    if min_gain is not None:
        info = json.loads((run / "run.json").read_text())
        info["report"]["min_teacher_gain"] = min_gain
        (run / "run.json").write_text(json.dumps(info))
    return run


def test_small_teacher_gain_left_out_with_a_warning(tmp_path):
    """Issue 38: a teacher that gained +0.004 made a normalized score of 9.13. Under the minimum (default 0.05) the
    domain is 'teacher gain too small': left out of the score, marked in summary.json, warned in the report."""
    run = _run_with(tmp_path, 0.404)  # gain +0.004: the student's +0.2 would be a recovery of 50
    summary = build_report(run)
    code = summary["domains"]["code"]
    assert code["recovery"] is None and code["status"] == "teacher gain too small"
    assert "status" not in summary["domains"]["math"]
    assert summary["normalized_score"] == pytest.approx(0.75)  # math alone
    [warning] = summary["warnings"]
    assert warning.startswith("code: teacher gain too small: teacher 'rl_code' gained +0.004") and "0.05" in warning
    md = (run / "report.md").read_text()
    assert f"**Warning:** {warning}." in md.split("## Teacher gain recovered")[0]  # above the table
    assert "teacher gain too small" in (run / "report.html").read_text()


def test_min_teacher_gain_is_a_setting(tmp_path):
    """The minimum comes from the recipe (`report.min_teacher_gain`, written to run.json); a gain at it counts."""
    at_minimum = build_report(_run_with(tmp_path, 0.5, min_gain=0.1))  # gain 0.1 >= 0.1: kept
    assert at_minimum["warnings"] == [] and at_minimum["domains"]["code"]["recovery"] == pytest.approx(2.0)
    under = build_report(_run_with(tmp_path, 0.5, min_gain=0.2))  # gain 0.1 < 0.2: left out
    assert under["domains"]["code"]["recovery"] is None and "under the minimum 0.2" in under["warnings"][0]
    kept = build_report(_run_with(tmp_path, 0.404, min_gain=0.0))  # 0: any positive gain, as before the minimum
    assert kept["domains"]["code"]["recovery"] == pytest.approx((0.6 - 0.4) / 0.004)
    assert recovery(0.0, 0.05, 0.05) == 1.0 and recovery(0.0, 0.0499, 0.05) is None  # the default's edge
    assert recovery(0.3, 0.3, 0.5, min_gain=0.0) is None  # a minimum of 0 still needs a gain to divide by


def test_missing_data_and_malformed_lines(tmp_path):
    run = make_run(tmp_path / "run", bad_line=True)
    (run / "mopd_r2" / "final" / "mopd.json").unlink()  # unfinished second round
    for name in ("rl_math", "rl_code", "mopd", "mopd_r2"):  # no reward / KL curves anywhere
        (run / name / "metrics.jsonl").write_text('{"step": 0, "entropy": 1.0}\n')
    (run / "reverse_kl.png").write_bytes(b"stale")
    with pytest.warns(RuntimeWarning, match="malformed"):
        summary = build_report(run)
    assert summary["normalized_score"] == pytest.approx(0.625)
    assert not (run / "reward.png").exists() and not (run / "reverse_kl.png").exists()
    assert (run / "entropy.png").exists()
    md = (run / "report.md").read_text()
    assert "reverse_kl.png" not in md
    assert "| mopd_r2 | mopd | mopd |" in md and "no verified final/" in md
    assert "n/a on `math` for `mopd_r2`" in md


def test_missing_run_json(tmp_path):
    with pytest.raises(ValueError, match=r"run\.json: not found"):
        build_report(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"recipe": "x", "stages": {}, "report": {"start": "sft"}}))
    with pytest.raises(
        ValueError, match=r"run\.json: missing required key\(s\): report\.student, report\.teachers"
    ):
        build_report(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"run\.json: not valid JSON"):
        build_report(tmp_path)


def test_no_warning_on_clean_run(tmp_path):
    run = make_run(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_report(run)


def test_report_shows_the_students_best_and_worst_transcript_per_domain(tmp_path):
    """From the student's last eval (the highest step's samples/eval-<step>.jsonl), per domain the transcript of
    highest reward and of lowest, in report.md and report.html; a run without transcripts has no such section."""
    from mopd.eval.transcripts import samples_path, write_transcripts

    run = make_run(tmp_path / "run")
    assert "## Transcripts" not in (build_report(run), (run / "report.md").read_text())[1]

    def record(domain, reward, text):
        return {"step": 4, "kind": "eval", "domain": domain, "prompt": f"{domain}?", "reference": "r",
                "reward": reward, "turns": [{"role": "assistant", "text": text, "tool_call": False}]}

    write_transcripts(samples_path(run / "mopd", "eval", 2), [record("math", 0.0, "an older eval")])
    write_transcripts(samples_path(run / "mopd", "eval", 4), [
        record("math", 0.5, "half"), record("math", 1.0, "right <b>"), record("math", 0.0, "wrong"),
        record("code", 0.25, "only one")])
    build_report(run)
    md = (run / "report.md").read_text()
    section = md.split("## Transcripts (best and worst per domain)")[1]
    assert "`mopd/samples/eval-0000004.jsonl`" in section and "an older eval" not in section
    assert [line for line in section.splitlines() if line.startswith("assistant:")] == [
        "assistant: only one", "assistant: right <b>", "assistant: wrong"]  # code: one; math: best, worst
    assert "**best**, `math`" in section and "**worst**, `math`" in section
    page = (run / "report.html").read_text()
    assert "<pre>[math] reward 1.000  (reference: r)\nuser: math?\nassistant: right &lt;b&gt;</pre>" in page
