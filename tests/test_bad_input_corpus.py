"""Every case of the bad-input corpus (`bad_input_cases.py`), through the CLI's entry function in-process: a bad
input exits 2 with exactly one line that names the file (and the line, where the mistake has one), no traceback,
and no stage directory; a legal one loads. `mopd run` is stopped before any compute should a bad case load."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mopd.execution.runner as runner
from mopd.cli import app
from mopd.recipe.load import load_recipe

from .bad_input_cases import BASE, CASES, Case
from .test_report import make_run


def _refuse_to_run(*args, **kwargs):
    raise AssertionError("the input was accepted and a run would have started")


def _one_line(output: str) -> str:
    lines = [x for x in output.splitlines() if x.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{output}"
    assert "Traceback" not in output
    return lines[0]


def test_the_base_recipe_is_legal(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(BASE)
    assert load_recipe(tmp_path / "r.yaml").order == ["base", "teacher_add", "teacher_rev", "student"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus_case(case: Case, tmp_path: Path, monkeypatch) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(case.text())
    out = tmp_path / "out"
    if case.legal:
        load_recipe(recipe)
        return
    monkeypatch.setattr(runner, "_run_locked", _refuse_to_run)
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    line = _one_line(res.output)
    assert res.exit_code == 2, line
    assert line.startswith(f"error: {recipe}"), line
    if case.line is not None:
        assert line.startswith(f"error: {recipe}:{case.line}:"), line
    assert case.says in line, line
    assert not out.exists() or not [p for p in out.iterdir() if p.is_dir()]


def test_a_hub_model_that_is_not_here_is_refused_at_load(tmp_path: Path, monkeypatch) -> None:
    """Offline, a Hub id missing from the local cache is one line at load, not a minute of retries after the
    stages before it have trained."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.replace("    init: base\n    domains: [reversal]", "    init: no-org/no-model\n"
                                   "    domains: [reversal]"))
    monkeypatch.setattr(runner, "_run_locked", _refuse_to_run)
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "out")])
    line = _one_line(res.output)
    assert res.exit_code == 2 and line.startswith(f"error: {recipe}:20: stages.teacher_rev.init: Hub model "
                                                  "'no-org/no-model': not in the local Hugging Face cache"), line
    assert load_recipe(recipe, check_hub=False).order[-1] == "student"


def _plugin(tmp_path: Path, body: str) -> Path:
    (tmp_path / "plugin.py").write_text(body)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.replace("seed: 0\n", "seed: 0\nplugins: [plugin.py]\n"))
    return recipe


PLUGINS = {
    "raises": ("raise RuntimeError('boom')\n", "RuntimeError"),
    "exits": ("import sys\nsys.exit(0)\n", "SystemExit"),
    "syntax error": ("def broken(:\n", "SyntaxError"),
    "imports what is not installed": ("import no_such_module_anywhere\n", "ModuleNotFoundError"),
}


@pytest.mark.parametrize("kind", list(PLUGINS))
def test_plugins_that_fail_on_import(kind: str, tmp_path: Path, monkeypatch) -> None:
    body, says = PLUGINS[kind]
    recipe = _plugin(tmp_path, body)
    monkeypatch.setattr(runner, "_run_locked", _refuse_to_run)
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "out")])
    line = _one_line(res.output)
    assert res.exit_code == 2 and line.startswith(f"error: {recipe}:3:") and says in line, line


DOMAIN_PLUGINS = {
    "generator raises": ("def gen(rng, d):\n    raise ValueError('no')\n", "", "its generator raised ValueError"),
    "generator returns one string": ("def gen(rng, d):\n    return 'x='\n", "", "must return (prompt: str"),
    "generator returns characters outside the alphabet": ("def gen(rng, d):\n    return ('X=', 'Y')\n", "",
                                                           "outside ALPHABET"),
    "generator exits": ("import sys\ndef gen(rng, d):\n    sys.exit(3)\n", "", "raised SystemExit"),
    "verifier raises": ("def gen(rng, d):\n    return (f'a{rng.randint(0, 999)}=', 'b')\n", "verify=lambda p, c: 1 / 0",
                        "its verifier raised ZeroDivisionError"),
    "verifier returns nan": ("def gen(rng, d):\n    return (f'a{rng.randint(0, 999)}=', 'b')\n", "verify=lambda p, c: float('nan')",
                             "not a number in [0, 1]"),
    "too few distinct prompts": ("def gen(rng, d):\n    return ('a=', 'b')\n", "", "distinct held-out prompts"),
    "verifier returns a string": ("def gen(rng, d):\n    return (f'a{rng.randint(0, 999)}=', 'b')\n", "verify=lambda p, c: 'yes'",
                                  "not a number in [0, 1]"),
}


@pytest.mark.parametrize("kind", list(DOMAIN_PLUGINS))
def test_plugin_domains_that_break_their_contract_are_refused_at_load(kind: str, tmp_path: Path, monkeypatch) -> None:
    """A plugin domain is probed at load (a few problems of every difficulty, generated and verified): one that
    raises, exits, or returns what the contract forbids is one line naming the domain, before any compute."""
    from mopd.envs import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the plugin's registration stays in this test
    body, verify, says = DOMAIN_PLUGINS[kind]
    name = "broken_" + re.sub(r"\W", "_", kind)
    (tmp_path / "plugin.py").write_text("from mopd.envs import register_domain\n" + body
                                        + f"register_domain({name!r}{', ' + verify if verify else ''})(gen)\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.replace("seed: 0\n", "seed: 0\nplugins: [plugin.py]\n")
                      .replace("domains: [addition, reversal]", f"domains: [addition, reversal, {name}]")
                      .replace("    teachers: {addition: teacher_add, reversal: teacher_rev}",
                               f"    teachers: {{addition: teacher_add, reversal: teacher_rev, {name}: teacher_rev}}"))
    monkeypatch.setattr(runner, "_run_locked", _refuse_to_run)
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "out")])
    line = _one_line(res.output)
    assert res.exit_code == 2 and line.startswith(f"error: {recipe}:4: domains.2: domain {name!r}") and says in line, line


def _command_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    good = tmp_path / "good.yaml"
    good.write_text(BASE)
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "a_file").write_text("x")
    ro = tmp_path / "read_only"
    ro.mkdir()
    os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR)
    (tmp_path / "locked" / ".mopd.lock").mkdir(parents=True)
    return {
        "recipe missing": (["run", str(tmp_path / "nope.yaml")], "no such recipe file"),
        "recipe a directory": (["run", str(tmp_path / "a_dir")], "not a file"),
        "recipe binary": (["run", str(tmp_path / "binary.yaml")], "cannot read it as a YAML text file"),
        "out a file": (["run", str(good), "--out", str(tmp_path / "a_file")], "cannot use it as a run directory"),
        "out inside a file": (["run", str(good), "--out", str(tmp_path / "a_file" / "x")], "Not a directory"),
        "out read-only": (["run", str(good), "--out", str(ro / "run")], "cannot write"),
        "threads absurd": (["run", str(good), "--threads", "100000"], "threads per core"),
        "report of no run": (["report", str(tmp_path / "a_dir")], "run.json"),
        "compare without a block": (["compare", str(good)], "no `compare:` block"),
        "lock a directory": (["run", str(good), "--out", str(tmp_path / "locked")],
                             f"Is a directory: {tmp_path / 'locked' / '.mopd.lock'}"),
        "report out under a file": (["report", str(make_run(tmp_path / "run")), "--out", str(tmp_path / "a_file" / "r")],
                                    "cannot write the report there"),
    }


COMMAND_CASES = ["recipe missing", "recipe a directory", "recipe binary", "out a file", "out inside a file",
                 "out read-only", "threads absurd", "report of no run", "compare without a block", "lock a directory", "report out under a file"]


@pytest.mark.parametrize("name", COMMAND_CASES)
def test_command_line_cases(name: str, tmp_path: Path, monkeypatch) -> None:
    args, says = _command_cases(tmp_path)[name]
    if name == "out read-only" and os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory; see test_out_that_root_cannot_write")
    monkeypatch.setattr(runner, "_run_locked", _refuse_to_run)
    res = CliRunner().invoke(app, args)
    line = _one_line(res.output)
    assert res.exit_code == 2 and line.startswith("error: ") and says in line, line


def test_corpus_size() -> None:
    """The issue asks for at least 80 cases; each id is distinct, so each is its own test. Checkpoints whose
    weights are not their config's model and prompts too long to prefill (issue 36) are cases too, in
    test_inputs_nobody_tried.py."""
    from .test_inputs_nobody_tried import LONG_PROMPTS, MISMATCHES

    n = len(CASES) + len(PLUGINS) + len(DOMAIN_PLUGINS) + len(COMMAND_CASES) + len(MISMATCHES) + len(LONG_PROMPTS)
    assert n >= 80 and len({c.id for c in CASES}) == len(CASES), n
    assert sum(c.legal for c in CASES) >= 3


def test_messages_are_one_line_at_any_terminal_width(tmp_path: Path, monkeypatch) -> None:
    """rich wraps long lines at the terminal's width unless told not to: a 40-column terminal still gets one."""
    monkeypatch.setenv("COLUMNS", "40")
    recipe = tmp_path / ("a-long-directory-name-" * 4) / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(BASE.replace("    steps: 4\n", "    steps: 0\n"))
    res = CliRunner().invoke(app, ["run", str(recipe)])
    assert re.fullmatch(r"error: .*:9: .*steps.*", _one_line(res.output)), res.output


def test_a_plugin_domain_that_fails_mid_run_stops_in_one_line(tmp_path: Path, monkeypatch) -> None:
    """A generator that passes the load-time probe and fails later (here on its 60th call) ends the run with one
    line naming the domain; the stages finished before it stay finished."""
    from mopd.envs import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    (tmp_path / "plugin.py").write_text(
        "from mopd.envs import register_domain\ncalls = [0]\n"
        "@register_domain('flaky', difficulties=(1,))\ndef flaky(rng, d):\n    calls[0] += 1\n"
        "    if calls[0] > 60:\n        raise OSError('the service behind this domain went away')\n"
        "    return (f'rev:{rng.randint(0, 999)}=', 'a')\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.replace("seed: 0\n", "seed: 0\nplugins: [plugin.py]\n")
                      .replace("domains: [addition, reversal]", "domains: [addition, flaky]")
                      .replace("domains: [reversal]", "domains: [flaky]")
                      .replace("reversal: teacher_rev}", "flaky: teacher_rev}"))
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "out")])
    errors = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert len(errors) == 1 and "domain 'flaky': its generator raised OSError at difficulty 1: the service" in errors[0]
