"""Experiment trackers: every metrics.jsonl record reaches TensorBoard, W&B (offline), trackio and MLflow (local
stores) as `<stage>/<metric>` at one global step, read back with each tracker's own reader; a run killed and
resumed continues the same tracker runs with no step twice; a tracker that is not installed is one line at load.
"""

from __future__ import annotations

import json
import os
import textwrap
from importlib.util import find_spec
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mopd.cli import app
from mopd.core.errors import RecipeError
from mopd.core.schema import LoggingSettings
from mopd.execution.runner import run_recipe
from mopd.recipe.load import load_recipe
from mopd.stages import run as run_module
from mopd.tracking import numbers, with_trackers

from .tracker_stores import (
    jsonl_points,
    mlflow_points,
    tensorboard_points,
    tensorboard_texts,
    trackio_points,
    trackio_tables,
    wandb_points,
    wandb_table_keys,
)

RECIPE = textwrap.dedent(
    """\
    name: {name}
    seed: 0
    domains: [reversal, sorting]
    eval: {{size: 8, max_new_tokens: 6}}
    logging: {logging}
    stages:
      base:
        kind: pretrain
        model: {{hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}}
        steps: 4
        batch_size: 8
        checkpoint_every: 2
      sft: {{kind: sft, init: base, steps: 6, batch_size: 8, checkpoint_every: 2}}
    """
)
ALL = "{tensorboard: true, wandb: {mode: offline}, trackio: {}, mlflow: {}}"
OFFSETS = {"base": 0, "sft": 5}  # base owns global steps 0..4, sft 5..11; summary values at 12


@pytest.fixture
def trackers_env(tmp_path: Path, monkeypatch) -> Path:
    missing = [m for m in ("tensorboard", "wandb", "trackio", "mlflow", "sqlalchemy") if not find_spec(m)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (pip install -e '.[dev]')")
    # tests/conftest.py points TRACKIO_DIR at a fresh directory for the session, before trackio is imported
    from trackio.utils import TRACKIO_DIR

    assert str(TRACKIO_DIR) == os.environ["TRACKIO_DIR"], "trackio would write to the user's own store"
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def _recipe(tmp_path: Path, name: str, logging: str = ALL) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPE.format(name=name, logging=logging))
    return path


def _assert_same(got: dict, expected: dict, tracker: str, redone: tuple[int, ...] = ()) -> None:
    """The same (step, key) points with the same values, each as often: a step logged twice shows twice. At a
    `redone` step (after the checkpoint a killed stage resumed from) the trackers keep the first attempt's
    record: the same numbers (resume is exact) but for its wall-clock `time` and `time/*` split, of which only the
    count is compared."""
    assert got.keys() == expected.keys(), tracker
    for key, values in expected.items():
        if key[0] in redone and (key[1].endswith("/time") or "/time/" in key[1]):
            assert len(got[key]) == len(values), (tracker, key)
        else:
            assert got[key] == pytest.approx(values), (tracker, key)


def _history(points: dict) -> dict:
    """Points less the summary values logged at the run's last step."""
    return {k: v for k, v in points.items() if not k[1].startswith("summary/")}


def _assert_stores_match(out: Path, project: str, redone: tuple[int, ...] = ()) -> None:
    expected = jsonl_points(out, OFFSETS)
    run_name = f"{project}-{json.loads((out / 'tracking' / 'state.json').read_text())['run_id']}"

    tb = tensorboard_points(out / "tracking" / "tensorboard" / run_name)
    assert tb[(12, "summary/sft/eval/reversal")] == pytest.approx(expected[(11, "sft/eval/reversal")])
    _assert_same(_history(tb), expected, "tensorboard", redone)

    wb, wb_summary, wb_ids = wandb_points(out / "tracking")
    assert wb_ids == {run_name.rsplit("-", 1)[1]}
    assert all(len(v) == 1 for v in wb.values())  # one row per step: W&B merges what one step logs twice
    _assert_same({k: v[-1:] for k, v in wb.items()}, {k: v[-1:] for k, v in expected.items()}, "wandb", redone)
    assert wb_summary["sft/eval/sorting"] == expected[(OFFSETS["sft"] + 6, "sft/eval/sorting")][0]

    ml, ml_runs = mlflow_points(out / "tracking" / "mlflow.db")
    assert len(ml_runs) == 1 and ml_runs[0].data.tags["mopd.run_id"] == run_name.rsplit("-", 1)[1]
    assert ml_runs[0].data.params["identities.sft"] == json.loads((out / "sft" / "stage.json").read_text())["identity"]
    _assert_same(_history(ml), expected, "mlflow", redone)

    tr, tr_runs = trackio_points(project)
    assert tr_runs == [run_name]
    _assert_same(_history(tr), expected, "trackio", redone)
    # eval scores as summary values, at the run's last step
    assert ml[(12, "summary/sft/eval/reversal")] == tr[(12, "summary/sft/eval/reversal")] == pytest.approx(
        expected[(11, "sft/eval/reversal")])


def test_every_record_reaches_every_tracker(trackers_env: Path) -> None:
    out = trackers_env / "out"
    run_recipe(load_recipe(_recipe(trackers_env, "tracked_all")), out, Console(quiet=True))
    _assert_stores_match(out, "tracked_all")
    # the run's config: the recipe, identities and lineage
    config = json.loads(next((out / "tracking" / "mlflow-artifacts").glob("*/artifacts/config.json")).read_text())
    assert config["recipe"]["stages"]["sft"]["steps"] == 6
    assert config["lineage"]["sft"]["parents"] == {"base": config["identities"]["base"]}


def test_kill_and_resume_continue_the_same_tracker_runs_without_duplicate_steps(trackers_env: Path,
                                                                             monkeypatch) -> None:
    recipe = load_recipe(_recipe(trackers_env, "tracked_resume"))
    out = trackers_env / "out"
    real, calls = run_module.supervised_loss, {"n": 0}

    def killed_in_sft_step_6(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4 + 6:  # base's 4 steps, then sft's 6th: steps 1-5 logged, checkpoint at 4
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "supervised_loss", killed_in_sft_step_6)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out, Console(quiet=True))
    assert json.loads((out / "tracking" / "state.json").read_text())["logged"]["sft"] == [5, 1]
    assert [r.info.status for r in mlflow_points(out / "tracking" / "mlflow.db")[1]] == ["FAILED"]
    monkeypatch.setattr(run_module, "supervised_loss", real)
    run_recipe(recipe, out, Console(quiet=True))  # resumes sft from its step-4 checkpoint and redoes step 5
    assert [json.loads(x)["step"] for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, 3, 4, 5, 6, 6]
    _assert_stores_match(out, "tracked_resume", redone=(OFFSETS["sft"] + 5,))
    assert len(list((out / "tracking" / "wandb").glob("offline-run-*"))) == 2  # one W&B run, written twice

    # a rerun with everything finished replays nothing new
    run_recipe(recipe, out, Console(quiet=True))
    _assert_stores_match(out, "tracked_resume", redone=(OFFSETS["sft"] + 5,))


SAMPLED = textwrap.dedent(
    """\
    name: {name}
    seed: 0
    domains: [reversal]
    eval: {{size: 4, max_new_tokens: 6}}
    logging: {logging}
    stages:
      base:
        kind: pretrain
        model: {{hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}}
        steps: 2
        batch_size: 8
      rl: {{kind: rlvr, init: base, steps: 4, batch_size: 2, group_size: 2, max_new_tokens: 6, log_samples: 2}}
    """
)


def test_logged_samples_reach_every_tracker_as_a_table(trackers_env: Path) -> None:
    """`log_samples: 2` over 4 steps: train-0000002/4.jsonl with each domain's rollouts, and the stage's table of
    them in each tracker (TensorBoard text at the last one's global step, W&B and trackio tables, MLflow's
    artifact), sent once."""
    path = trackers_env / "sampled.yaml"
    path.write_text(SAMPLED.format(name="tracked_samples", logging=ALL))
    out = trackers_env / "out"
    run_recipe(load_recipe(path), out, Console(quiet=True))
    files = sorted(p.name for p in (out / "rl" / "samples").glob("train-*"))
    assert files == ["train-0000002.jsonl", "train-0000004.jsonl"]
    records = [json.loads(x) for x in (out / "rl" / "samples" / files[0]).read_text().splitlines()]
    assert len(records) == 2 and all(r["step"] == 2 and r["domain"] == "reversal" for r in records)  # 2 a domain
    run_name = f"tracked_samples-{json.loads((out / 'tracking' / 'state.json').read_text())['run_id']}"
    texts = tensorboard_texts(out / "tracking" / "tensorboard" / run_name)
    rl_offset = 3  # base owns global steps 0..2
    assert [k for k in texts if k[1].startswith("rl/samples")] == [(rl_offset + 4, "rl/samples/text_summary")]
    text = texts[(rl_offset + 4, "rl/samples/text_summary")]
    assert records[0]["prompt"] in text and text.count("\n| 2 | reversal |") == text.count("\n| 4 | reversal |") == 2
    assert wandb_table_keys(out / "tracking") == ["rl/samples"]
    assert [(step, key) for step, key, _ in trackio_tables("tracked_samples")] == [(rl_offset + 4, "rl/samples")]
    table = json.loads(next((out / "tracking" / "mlflow-artifacts").glob("*/artifacts/rl/samples.json")).read_text())
    assert table["columns"] == ["step", "domain", "reward", "prompt", "transcript"] and len(table["data"]) == 4
    from mopd.recipe.identity import stage_identities

    unlogged = trackers_env / "unlogged.yaml"
    unlogged.write_text(SAMPLED.format(name="tracked_samples", logging=ALL).replace(", log_samples: 2", ""))
    assert stage_identities(load_recipe(unlogged)) == stage_identities(load_recipe(path))  # logging trains nothing
    run_recipe(load_recipe(path), out, Console(quiet=True))  # a rerun sends no table twice
    assert wandb_table_keys(out / "tracking") == ["rl/samples"] and len(trackio_tables("tracked_samples")) == 1


def test_a_tracker_not_installed_is_one_line_at_load(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError, match=r"tracked_missing\.yaml:5: .*the wandb tracker needs wandb: "
                                          r"pip install 'mopd\[wandb\]'"):
        load_recipe(_recipe(tmp_path, "tracked_missing", "{wandb: {project: p}}"))
    result = CliRunner().invoke(app, ["run", str(_recipe(tmp_path, "plain", "{}")), "--log", "wandb",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "pip install 'mopd[wandb]'" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing ran


def test_log_option_on_the_command_line(trackers_env: Path) -> None:
    recipe = _recipe(trackers_env, "tracked_cli", "{}")
    out = trackers_env / "out"
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out), "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    (logdir,) = (out / "tracking" / "tensorboard").iterdir()
    assert _history(tensorboard_points(logdir)).keys() == jsonl_points(out, OFFSETS).keys()
    result = CliRunner().invoke(app, ["run", str(recipe), "--log", "neptune"])
    assert result.exit_code == 2 and "unknown tracker 'neptune'; known: tensorboard, wandb" in result.output


def test_no_tracker_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_recipe(load_recipe(_recipe(tmp_path, "untracked", "{}")), out, Console(quiet=True))
    assert not (out / "tracking").exists()


def test_log_option_turns_trackers_on_over_the_recipe() -> None:
    settings = with_trackers(LoggingSettings.model_validate({"wandb": {"project": "mine"}}), ["tensorboard", "wandb"])
    assert settings.tensorboard is True and settings.wandb.project == "mine" and settings.mlflow is None
    assert with_trackers(LoggingSettings(), ["mlflow"]).mlflow.tracking_uri is None
    with pytest.raises(ValueError, match="unknown tracker 'neptune'"):
        with_trackers(LoggingSettings(), ["neptune"])
    assert numbers({"step": 3, "eval": {"m": {"score": 0.5}}, "recipe": "x", "ok": True}) == {
        "step": 3.0, "eval/m/score": 0.5, "ok": 1.0}


class _Recorder:
    """A tracker that keeps what it is sent."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []
        self.summaries: list[tuple[int, dict]] = []

    def log(self, metrics: dict, step: int) -> None:
        self.logged.append((step, metrics))

    def summary(self, values: dict, step: int) -> None:
        self.summaries.append((step, values))

    def close(self, failed: bool = False) -> None:
        pass


def test_fan_out_watermark_and_summary(tmp_path: Path) -> None:
    from mopd.tracking.fanout import Trackers, _state

    tracker = _Recorder()
    fan = Trackers([tracker], tmp_path, {"run_id": "r", "layout": {}, "logged": {"sft": [2, 1]}}, {"sft": 10}, 14)
    for record in ({"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
                   {"step": 3, "eval/a": 0.5}):
        fan.record("sft", record)
    assert tracker.logged == [(13, {"sft/step": 3.0, "sft/loss": 3.0}), (13, {"sft/step": 3.0, "sft/eval/a": 0.5})]
    assert json.loads((tmp_path / "state.json").read_text())["logged"] == {"sft": [3, 2]}
    report = {"recipe": "x", "normalized_score": 0.9, "domains": {"a": {"recovery": 0.5, "teacher": None}}}
    fan.summary(report)
    fan.summary(report)  # nothing new: not sent twice
    assert tracker.summaries == [(14, {"sft/eval/a": 0.5, "report/normalized_score": 0.9,
                                       "report/domains/a/recovery": 0.5})]
    # the tracker run goes on while the stages keep their identities and offsets, a new one starts otherwise
    saved = tmp_path / "state.json"
    (tmp_path / "state.json").write_text(json.dumps({"run_id": "r", "layout": {"sft": [10, "a"]}, "logged": {}}))
    assert _state(saved, {"sft": [10, "a"], "later": [15, "b"]})["run_id"] == "r"
    assert _state(saved, {"sft": [10, "changed"]})["run_id"] != "r"
