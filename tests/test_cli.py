"""The command line's `--threads`: it sets torch's CPU thread count for the run, and a bad value is refused
before anything runs."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from mopd.cli import app

ONE_STAGE = """\
name: one
domains: [reversal]
eval: {size: 4, max_new_tokens: 4}
stages:
  base:
    kind: pretrain
    model: {hidden_size: 16, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 32}
    steps: 1
    batch_size: 4
"""


def test_threads_option_sets_torch_threads_for_the_run(tmp_path: Path, monkeypatch) -> None:
    import mopd.cli as cli

    (tmp_path / "r.yaml").write_text(ONE_STAGE)
    before = torch.get_num_threads()
    seen: list[int] = []
    real = cli._run

    def record(recipe, out, *rest, **options):
        seen.append(torch.get_num_threads())
        return real(recipe, out, *rest, **options)

    monkeypatch.setattr(cli, "_run", record)
    torch.set_num_threads(2)  # so that the option has something to change
    try:
        res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"),
                                       "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    assert res.exit_code == 0, res.output
    assert seen == [1]
    assert (tmp_path / "out" / "base" / "final" / "config.json").exists()


def test_bad_threads_value_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(ONE_STAGE)
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"),
                                   "--threads", "0"])
    assert res.exit_code == 2
    assert "--threads" in res.output
    assert not (tmp_path / "out").exists()
