"""Hostile or unlucky input (issue 15): stage names that are paths, YAML that says a key twice, numbers that are
not what they look like, plugins that exit, non-finite steps, trainer states that would run code, two runs into
one directory. Each is refused in one line before it can do harm, and nothing saved is lost."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from mopd.core.errors import StageError
from mopd.execution.run_lock import RunLockedError, run_lock
from mopd.execution.runner import run_recipe
from mopd.models.checkpoint import check_finite_weights
from mopd.recipe.load import RecipeError, load_recipe
from mopd.stages.guards import DivergenceWatch

from .conftest import MINI_RECIPE

BASE_ONLY = textwrap.dedent(
    """\
    name: tiny
    domains: [reversal]
    eval: {size: 4, max_new_tokens: 4}
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 16, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 32}
        steps: 4
        batch_size: 4
        checkpoint_every: 2
    """
)


def _load_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def _with_stage_name(name: str) -> str:
    data = yaml.safe_load(MINI_RECIPE)
    data["stages"] = {name: data["stages"]["base"]}
    data.pop("report", None)
    return yaml.safe_dump(data, sort_keys=False)


@pytest.mark.parametrize("name", ["../../x", "/tmp/elsewhere", ".", "..", "", ".hidden", "-x", "a/b", "a b"])
def test_stage_names_that_are_not_identifiers_are_refused_at_load(tmp_path: Path, name: str) -> None:
    msg = _load_error(tmp_path, _with_stage_name(name))
    assert f"stage name {name!r} is not allowed" in msg and "letters, digits" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing created


def test_ordinary_stage_names_still_load(tmp_path: Path) -> None:
    for name in ("base", "teacher_add-2", "qwen3_0.6b", "2nd"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(_with_stage_name(name))
        assert list(load_recipe(path).recipe.stages) == [name]


def test_a_key_said_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    assert "    steps: 6\n" in MINI_RECIPE
    text = MINI_RECIPE.replace("    steps: 6\n", "    steps: 6\n    steps: 60\n", 1)
    msg = _load_error(tmp_path, text)
    assert "key 'steps' appears twice" in msg and "first on line" in msg


@pytest.mark.parametrize(("old", "new", "key"), [
    ("    steps: 6\n", "    steps: true\n", "steps"),
    ("    checkpoint_every: 3\n", "    checkpoint_every: 3\n    lr: .inf\n", "lr"),
    ("    checkpoint_every: 3\n", "    checkpoint_every: 3\n    lr: .nan\n", "lr"),
    ("    steps: 6\n", "    steps: '6'\n", "steps"),
])
def test_numbers_must_be_numbers_and_finite(tmp_path: Path, old: str, new: str, key: str) -> None:
    assert old in MINI_RECIPE
    msg = _load_error(tmp_path, MINI_RECIPE.replace(old, new, 1))
    assert f"stages.base.{key}" in msg


def test_a_plugin_that_exits_is_a_recipe_error_not_a_silent_exit(tmp_path: Path) -> None:
    (tmp_path / "plugin.py").write_text("import sys\nsys.exit(0)\n")
    data = yaml.safe_load(MINI_RECIPE)
    data["plugins"] = ["plugin.py"]
    msg = _load_error(tmp_path, yaml.safe_dump(data, sort_keys=False))
    assert "plugins.0" in msg and "SystemExit" in msg


def test_a_recipe_that_is_a_directory_or_binary_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not a file"):
        load_recipe(tmp_path)
    binary = tmp_path / "r.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(RecipeError, match="cannot read it as a YAML text file"):
        load_recipe(binary)


def _patched_loss(monkeypatch, bad_step: int, value: float) -> None:
    import mopd.stages.run as run_module

    real = run_module.supervised_loss

    def loss(model, tokenizer, problems, **kw):
        out, metrics = real(model, tokenizer, problems, **kw)
        calls.append(1)
        return (out * value if len(calls) == bad_step else out), metrics

    calls: list[int] = []
    monkeypatch.setattr(run_module, "supervised_loss", loss)


def test_a_nonfinite_loss_stops_the_stage_in_one_line_and_saves_nothing(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "r.yaml").write_text(BASE_ONLY)
    _patched_loss(monkeypatch, bad_step=3, value=float("nan"))
    with pytest.raises(StageError) as e:
        run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "run")
    assert str(e.value).startswith("stage 'base': step 3: loss is nan (not finite)") and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "base" / "final").exists()
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "base" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the non-finite step is not logged as trained


def test_skip_mode_skips_and_counts_the_nonfinite_step(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "r.yaml").write_text(BASE_ONLY.replace("checkpoint_every: 2", "checkpoint_every: 2\n    nonfinite: skip"))
    _patched_loss(monkeypatch, bad_step=2, value=float("inf"))
    run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "base" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite/skipped") for r in records[:4]] == [None, 1, None, None]
    assert (tmp_path / "run" / "base" / "final" / "model.safetensors").exists()


def test_nonfinite_weights_are_never_saved() -> None:
    good = torch.nn.Linear(2, 2)
    check_finite_weights("s", 1, good.parameters())
    with torch.no_grad():
        good.weight[0, 0] = float("inf")
    with pytest.raises(StageError, match="stage 's': step 1: the weights hold NaN or inf"):
        check_finite_weights("s", 1, good.parameters())


def test_divergence_watch_warns_once_on_a_collapsing_reward_and_a_rising_kl() -> None:
    said: list[str] = []
    watch = DivergenceWatch("student", said.append, window=3)
    for step, r in enumerate([0.5, 0.6, 0.7, 0.7, 0.6, 0.1, 0.0, 0.0, 0.0, 0.0], 1):
        watch.observe(step, {"reward/mean": r})
    assert len(said) == 1 and "stage 'student'" in said[0] and "reward/mean" in said[0]
    calm: list[str] = []
    steady = DivergenceWatch("student", calm.append, window=3)
    for step in range(1, 40):
        steady.observe(step, {"reward/mean": 0.5 + 0.01 * (step % 3), "mopd/reverse_kl": 0.05})
    assert calm == []
    kl: list[str] = []
    rising = DivergenceWatch("student", kl.append, window=3)
    for step, v in enumerate([0.05, 0.05, 0.05, 0.5, 2.0, 3.0, 4.0], 1):
        rising.observe(step, {"mopd/reverse_kl": v})
    assert len(kl) == 1 and "mopd/reverse_kl" in kl[0]


def test_a_crafted_trainer_state_is_refused_without_running_its_code(tmp_path: Path, monkeypatch) -> None:
    """A resumable checkpoint whose trainer state would execute code when unpickled: the stage refuses it in one
    line and the code never runs."""
    (tmp_path / "r.yaml").write_text(BASE_ONLY)
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "base" / "checkpoints" / "step-0000002"
    run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "first")  # a real checkpoint layout to copy
    shutil.copytree(tmp_path / "first" / "base" / "final", ckpt)
    (tmp_path / "run" / "base").mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "first" / "base" / "stage.json", tmp_path / "run" / "base" / "stage.json")

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with (ckpt / "trainer_state.pt").open("wb") as f:
        pickle.dump({"step": 2, "optimizer": Payload()}, f)
    with pytest.raises(StageError, match="cannot be read safely"):
        run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "run")
    assert not marker.exists()


def test_a_second_run_into_a_locked_directory_fails_in_one_line_naming_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom mopd.execution.run_lock import run_lock\n"
         "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(30)\n", str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError) as e, run_lock(tmp_path / "run"):
            pass
        assert f"process {holder.pid}" in str(e.value) and "\n" not in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path / "run"):  # released by the kernel when its holder died
        pass


def test_out_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunLockedError, match="cannot use it as a run directory"), run_lock(tmp_path / "file"):
        pass


def test_a_reference_to_an_eval_stage_or_a_directory_without_a_model_is_one_line(tmp_path: Path) -> None:
    data = yaml.safe_load(MINI_RECIPE)
    data["stages"]["scores"] = {"kind": "eval", "models": ["base"]}
    data["stages"]["sft"]["init"] = "scores"
    msg = _load_error(tmp_path, yaml.safe_dump(data, sort_keys=False))
    assert "stages.sft.init" in msg and "'scores' is an eval stage" in msg
    (tmp_path / "empty_model").mkdir()
    data = yaml.safe_load(MINI_RECIPE)
    data["stages"]["sft"]["init"] = "./empty_model"
    msg = _load_error(tmp_path, yaml.safe_dump(data, sort_keys=False))
    assert "stages.sft.init" in msg and "without a Hugging Face model (no config.json)" in msg


def test_absurd_thread_counts_are_refused_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mopd.cli import app

    (tmp_path / "r.yaml").write_text(BASE_ONLY)
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"),
                                   "--threads", "100000"])
    assert res.exit_code == 2 and "--threads 100000: more than 8 threads per core" in res.output
    assert not (tmp_path / "run").exists()


def test_a_failed_rerun_keeps_the_finished_stages_in_run_json_and_report_says_what_is_missing(
    tmp_path: Path, monkeypatch
) -> None:
    """A rerun that stops early must not shrink run.json to the stages it reached; a report over a run with an
    unfinished stage says so and `mopd report` exits non-zero; an unreadable run.json is moved aside, not lost."""
    from typer.testing import CliRunner

    import mopd.stages.rl as rl
    from mopd.cli import app

    (tmp_path / "r.yaml").write_text(MINI_RECIPE)
    run = tmp_path / "run"
    run_recipe(load_recipe(tmp_path / "r.yaml"), run)
    before = json.loads((run / "run.json").read_text())["stages"]
    # the student changes and fails at its first step: the finished stages must stay in run.json
    assert "    alpha: 0.5\n" in MINI_RECIPE
    (tmp_path / "r.yaml").write_text(MINI_RECIPE.replace("    alpha: 0.5\n", "    alpha: 0.25\n"))
    real = rl.policy_loss
    monkeypatch.setattr(rl, "policy_loss", lambda *a, **k: (lambda out: (out[0] * float("nan"), out[1]))(real(*a, **k)))
    with pytest.raises(StageError):
        run_recipe(load_recipe(tmp_path / "r.yaml"), run)
    after = json.loads((run / "run.json").read_text())["stages"]
    assert set(after) == set(before) - {"student"}  # the changed student is no longer what this run holds
    assert after["teacher_add"]["identity"] == before["teacher_add"]["identity"]
    assert after["teacher_add"]["wall_seconds"] == before["teacher_add"]["wall_seconds"]
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 2 and "incomplete run: no verified finished checkpoint for student" in res.output
    assert "**Incomplete:**" in (run / "report.md").read_text()
    monkeypatch.undo()
    (run / "run.json").write_text("{ not json")
    run_recipe(load_recipe(tmp_path / "r.yaml"), run)
    assert list((run / ".superseded").glob("run.json-unreadable-*"))
    assert set(json.loads((run / "run.json").read_text())["stages"]) == set(before)
    assert "missing_stages" not in json.loads((run / "summary.json").read_text())
