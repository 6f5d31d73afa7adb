"""Corrupt files in a run directory (issue 15, item 5): every checkpoint records the size and sha256 of its files
in its lineage and is verified before a stage counts as finished, before a stage resumes from it, and before a
report uses it. A finished stage that fails is run again (its remains moved to `.superseded/`); a resumable
checkpoint that fails is set aside and the older of the two kept is resumed; a report names the bad file."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mopd.cli import app
from mopd.execution.runner import run_recipe
from mopd.models.integrity import checkpoint_problem, lineage_checksum, sealed_lineage, stage_output_problem
from mopd.recipe.load import load_recipe
from mopd.stages import run as run_module

from .conftest import MINI_RECIPE
from .test_hardening import BASE_ONLY

BASE = BASE_ONLY.replace("    steps: 4\n", "    steps: 6\n")  # checkpoints at steps 2 and 4, then two more steps


def _run(recipe: Path, out: Path) -> str:
    buf = io.StringIO()
    run_recipe(load_recipe(recipe), out, Console(file=buf, width=400))
    return buf.getvalue()


def _rows(stage: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time")}
            for x in (stage / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted run of BASE: (recipe, run directory), copied by each test that damages it."""
    root = tmp_path_factory.mktemp("finished")
    (root / "r.yaml").write_text(BASE)
    _run(root / "r.yaml", root / "run")
    return root / "r.yaml", root / "run"


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _edit_eval(p: Path) -> None:  # valid JSON, a plausible number: only the lineage's own checksum can tell
    lineage = json.loads(p.read_text())
    lineage["metrics"]["eval"]["reversal"]["score"] = 0.99
    p.write_text(json.dumps(lineage))


DAMAGE = {
    "weights truncated": ("final/model.safetensors", _truncate),
    "weights bit flip": ("final/model.safetensors", _flip_byte),
    "config deleted": ("final/config.json", Path.unlink),
    "tokenizer garbage": ("final/tokenizer.json", lambda p: p.write_text("{ garbage")),
    "lineage garbage": ("final/mopd.json", lambda p: p.write_text("\x00\x01 not json")),
    "lineage deleted": ("final/mopd.json", Path.unlink),
    "lineage edited": ("final/mopd.json", _edit_eval),
    "metrics truncated": ("metrics.jsonl", _truncate),
    "metrics deleted": ("metrics.jsonl", Path.unlink),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_finished_stage_that_fails_verification_runs_again_and_nothing_is_deleted(
    finished, tmp_path: Path, case: str
) -> None:
    recipe, good = finished
    run = tmp_path / "run"
    shutil.copytree(good, run)
    name, damage = DAMAGE[case]
    bad = run / "base" / name
    damage(bad)
    damaged = bad.read_bytes() if bad.exists() else None
    problem = stage_output_problem(run / "base")
    assert problem is not None and problem.startswith(str(bad)), problem

    console = _run(recipe, run)
    assert f"stage 'base': its finished output failed verification ({problem})" in console.replace("\n", "")
    kept = list((run / ".superseded").glob("base-unverified-*"))
    assert len(kept) == 1  # the damaged stage as it was, moved aside, not deleted
    assert ((kept[0] / name).read_bytes() if damaged is not None else None) == damaged
    if name != "final/model.safetensors":  # the undamaged weights went aside with it, byte for byte
        weights = "final/model.safetensors"
        assert (kept[0] / weights).read_bytes() == (good / "base" / weights).read_bytes()
    assert checkpoint_problem(run / "base" / "final") is None
    # the rerun is the same computation: the same weights and metrics as the good run
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (run / "base" / "final" / f).read_bytes() == (good / "base" / "final" / f).read_bytes(), f
    assert _rows(run / "base") == _rows(good / "base")


def test_an_intact_finished_stage_is_skipped_and_extra_files_do_not_matter(finished, tmp_path: Path) -> None:
    recipe, good = finished
    run = tmp_path / "run"
    shutil.copytree(good, run)
    (run / "base" / "final" / "notes.txt").write_text("a file added later, beside the sealed ones")
    console = _run(recipe, run)
    assert "skipped" in console and not (run / ".superseded").exists()


def _cut_at_step(monkeypatch, step: int) -> None:
    """Make the pretrain stage's `step`-th loss call (1-based) raise, as a kill would stop it."""
    real, calls = run_module.supervised_loss, {"n": 0}

    def cut(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "supervised_loss", cut)


@pytest.mark.parametrize("damaged", [["step-0000004"], ["step-0000004", "step-0000002"]])
def test_a_corrupt_resumable_checkpoint_falls_back_to_the_older_one(
    finished, tmp_path: Path, monkeypatch, damaged: list[str]
) -> None:
    """Two resumable checkpoints are kept; the newest failing verification is set aside (with a warning naming
    the file) and the stage resumes from the older one, or starts over when neither passes, and ends exactly as
    the uninterrupted run did."""
    recipe, good = finished
    run = tmp_path / "run"
    _cut_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        _run(recipe, run)
    ckpts = run / "base" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000004"]
    for name in damaged:
        _truncate(ckpts / name / "model.safetensors")
    monkeypatch.undo()

    console = _run(recipe, run).replace("\n", "")
    for name in damaged:
        assert f"resumable checkpoint {name} failed verification ({ckpts / name / 'model.safetensors'}: " in console
    fallback = "resuming from step-0000002" if len(damaged) == 1 else "no verified checkpoint left"
    assert fallback in console
    assert len(list((run / ".superseded").glob("base-step-*-unverified-*"))) == len(damaged)
    assert (run / "base" / "final" / "model.safetensors").read_bytes() == \
        (good / "base" / "final" / "model.safetensors").read_bytes()
    assert _rows(run / "base") == _rows(good / "base")


def test_the_report_names_the_corrupt_file_and_a_rerun_repairs_it(tmp_path: Path) -> None:
    """`mopd report` over a run whose student checkpoint was damaged exits 2 naming the file (no domain silently
    dropped, no score made up); `mopd run` then reruns that stage only and the report is whole again."""
    (tmp_path / "r.yaml").write_text(MINI_RECIPE)
    run = tmp_path / "run"
    _run(tmp_path / "r.yaml", run)
    summary = json.loads((run / "summary.json").read_text())
    weights = (run / "student" / "final" / "model.safetensors").read_bytes()
    edited = run / "student" / "final" / "mopd.json"
    lineage = json.loads(edited.read_text())
    del lineage["metrics"]["eval"][next(iter(lineage["metrics"]["eval"]))]  # a domain silently gone
    edited.write_text(json.dumps(lineage))

    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 2
    assert f"incomplete run: no verified finished checkpoint for student ({edited}: changed since it was written" \
        in res.output.replace("\n", "")
    bad = json.loads((run / "summary.json").read_text())
    assert bad["missing_stages"] == ["student"] and bad["normalized_score"] is None
    assert "changed since it was written" in bad["corrupt"]["student"]

    console = _run(tmp_path / "r.yaml", run)
    assert console.count("failed verification") == 1 and "stage 'student'" in console
    repaired = json.loads((run / "summary.json").read_text())
    assert "missing_stages" not in repaired and repaired["domains"] == summary["domains"]
    assert repaired["normalized_score"] == summary["normalized_score"]
    assert (run / "student" / "final" / "model.safetensors").read_bytes() == weights


def test_sealed_lineage_round_trips_and_rejects_paths_outside(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"abc")
    (d / "sub" / "b.txt").write_text("x")
    lineage = sealed_lineage(d, {"stage": "s", "path": Path("/x")})
    assert set(lineage["files"]) == {"a.bin", "sub/b.txt"} and lineage["path"] == "/x"
    (d / "mopd.json").write_text(json.dumps(lineage))
    assert checkpoint_problem(d) is None
    lineage["files"]["../outside"] = lineage["files"].pop("a.bin")
    lineage["checksum"] = lineage_checksum(lineage)  # a forged but self-consistent manifest
    (d / "mopd.json").write_text(json.dumps(lineage))
    assert "names a path outside the checkpoint" in checkpoint_problem(d)
