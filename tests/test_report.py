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
    assert set(summary) == {"recipe", "wall_seconds", "normalized_score", "domains"}
    assert summary["recipe"] == "demo" and summary["wall_seconds"] == 301.2
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
    assert "| code | 0.400 | 0.400 (rl_code) | 0.600 | n/a | 0.900 | n/a |" in md
    assert "n/a on `code`: the teacher `rl_code` did not improve on start" in md
    assert "excluded from the normalized score" in md


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
