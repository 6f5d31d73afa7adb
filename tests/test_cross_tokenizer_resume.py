"""kill -9 through a cross-tokenizer stage (issue 37, item 4): a MOPD student of a character tokenizer whose
reversal teacher is a BPE model (`cross_tokenizer: true`) beside a teacher of its own tokenizer is killed with
SIGKILL while the BPE teacher scores its first step after a checkpoint; the same command again resumes from that
checkpoint and ends with the uninterrupted run's metrics, step for step, and its final weights, byte for byte.

The kill is sent by the run to itself (a wrapper of `ForeignTeacher.sampled` in the killed process only), so it
lands at the same point on any machine: inside the cross-tokenizer scoring of the step after the first
checkpoint, not at a time that a slow or fast machine moves before the checkpoint or past the end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mopd.envs import ALPHABET
from mopd.models.tokenizer import build_char_tokenizer

from .xtok_setup import bpe_tokenizer, save_tiny

RECIPE = """\
name: xtok_resume
seed: 0
domains: [reversal, sorting]
eval: {{size: 2, max_new_tokens: 6}}
stages:
  student:
    kind: mopd
    init: {root}/student
    teachers:
      reversal: {{stage: {root}/t_bpe, cross_tokenizer: true}}
      sorting: {root}/t_char
    steps: 5
    batch_size: 4
    max_new_tokens: 8
    checkpoint_every: 2
    preflight: {{prompts: 2}}
"""

# `mopd run`, SIGKILLing itself when the cross-tokenizer teacher is asked to score after the first checkpoint
KILLED_RUN = textwrap.dedent("""\
    import os, signal, sys
    from pathlib import Path
    from mopd.teachers.cross_tokenizer import ForeignTeacher
    checkpoints = Path(sys.argv[-1]) / "student" / "checkpoints"
    real = ForeignTeacher.sampled
    def sampled(self, batch):
        if any(checkpoints.glob("step-*")):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, batch)
    ForeignTeacher.sampled = sampled
    from mopd.cli import app
    app(sys.argv[1:], prog_name="mopd")
""")


def _rows(stage: Path) -> list[dict]:
    rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]  # wall-clock seconds


@pytest.mark.slow  # three `mopd run` processes (two at once), most of their time start-up: ~40 s on 2 busy cores
def test_kill_9_in_a_cross_tokenizer_stage_then_rerun_equals_the_uninterrupted_run(tmp_path):
    char = build_char_tokenizer(ALPHABET)
    for seed, (name, tok) in enumerate({"student": char, "t_char": char, "t_bpe": bpe_tokenizer(512)}.items()):
        save_tiny(tmp_path / name, tok, seed, name)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(root=tmp_path))
    run = [sys.executable, "-m", "mopd", "run", str(recipe), "--out"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    # the uninterrupted run and the one that kills itself side by side: the same commands, the same numbers
    with (tmp_path / "whole.err").open("w") as err:
        whole = subprocess.Popen([*run, str(tmp_path / "whole")], stdout=subprocess.DEVNULL, stderr=err)
        cut = tmp_path / "cut"
        killed = subprocess.run([sys.executable, "-c", KILLED_RUN, "run", str(recipe), "--out", str(cut)],
                                timeout=300, **quiet)
        assert whole.wait(timeout=300) == 0, (tmp_path / "whole.err").read_text()
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stage = cut / "student"
    assert [p.name for p in (stage / "checkpoints").glob("step-*")] == ["step-0000002"]
    assert not (stage / "final").exists()
    before = (stage / "metrics.jsonl").read_text().splitlines()
    preflight = (stage / "preflight.json").read_bytes()
    assert [json.loads(x)["step"] for x in before] == [1, 2]  # killed inside step 3, before it was logged

    resumed = subprocess.run([*run, str(cut)], timeout=300, **quiet)
    assert resumed.returncode == 0, resumed.stderr
    after = (stage / "metrics.jsonl").read_text().splitlines()
    assert after[:2] == before  # resumed from step 2, not restarted (the first lines and their times untouched)
    assert (stage / "preflight.json").read_bytes() == preflight  # measured once, before the kill
    assert _rows(stage) == _rows(tmp_path / "whole" / "student")
    assert [r["step"] for r in _rows(stage) if "loss" in r] == [1, 2, 3, 4, 5]
    assert any(r[f"mopd/routing_share/{tmp_path}/t_bpe"] > 0 for r in _rows(stage) if "loss" in r)
    final = [(tmp_path / d / "student" / "final" / "model.safetensors").read_bytes() for d in ("cut", "whole")]
    assert final[0] == final[1]
    assert json.loads((cut / "run.json").read_text())["stages"]["student"]["status"] == "ran"
