"""Every recipe mistake is rejected before any compute, in one line naming the file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mopd.recipe.identity import stage_identities
from mopd.recipe.load import RecipeError, load_recipe

from .conftest import MINI_RECIPE


def _write(tmp_path: Path, data: dict | str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


def _mini() -> dict:
    return yaml.safe_load(MINI_RECIPE)


def _error(tmp_path: Path, data) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, data))
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "bad.yaml") in msg
    return msg


def test_mini_recipe_is_valid(mini_recipe: Path) -> None:
    loaded = load_recipe(mini_recipe)
    assert loaded.order.index("base") < loaded.order.index("sft") < loaded.order.index("student")


def test_unknown_key_names_line_and_key(tmp_path: Path) -> None:
    text = MINI_RECIPE.replace("    alpha: 0.5\n", "    alpha: 0.5\n    alhpa: 0.1\n")
    msg = _error(tmp_path, text)
    line = text.splitlines().index("    alhpa: 0.1") + 1
    assert f"bad.yaml:{line}: stages.student.alhpa: unknown key" in msg


def test_unknown_top_level_key(tmp_path: Path) -> None:
    d = _mini()
    d["sead"] = 3
    assert "sead: unknown key" in _error(tmp_path, d)


def test_unknown_stage_kind(tmp_path: Path) -> None:
    d = _mini()
    d["stages"]["sft"]["kind"] = "dpo_magic"
    msg = _error(tmp_path, d)
    assert "stages.sft" in msg and "unknown stage kind 'dpo_magic'" in msg


def test_reference_to_missing_stage(tmp_path: Path) -> None:
    d = _mini()
    d["stages"]["student"]["teachers"]["sorting"] = "teacher_sortt"
    msg = _error(tmp_path, d)
    assert "stages.student.teachers.sorting" in msg and "'teacher_sortt'" in msg


def test_missing_init(tmp_path: Path) -> None:
    d = _mini()
    d["stages"]["sft"]["init"] = "nowhere"
    assert "stages.sft.init" in _error(tmp_path, d)


def test_cycle(tmp_path: Path) -> None:
    d = _mini()
    d["stages"]["base"] = {"kind": "sft", "init": "sft", "steps": 1}
    msg = _error(tmp_path, d)
    assert "cycle" in msg and "base" in msg and "sft" in msg


def test_mopd_domain_without_teacher(tmp_path: Path) -> None:
    """A domain without a teacher is reward-only (GRPO in the stage): legal with `objective: sampled` only
    (tests/test_mopd_reward_only.py)."""
    d = _mini()
    del d["stages"]["student"]["teachers"]["reversal"]
    d["stages"]["student"]["objective"] = "topk"
    msg = _error(tmp_path, d)
    assert "stages.student.objective" in msg and "'reversal' has no teacher" in msg


def _foreign_model(directory: Path) -> Path:
    """A tiny HF model directory with a vocabulary the recipe's models do not share."""
    from mopd.models.tiny import TinyModelConfig, build_tiny_model
    from mopd.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("0123456789+=")  # a foreign vocabulary
    model = build_tiny_model(TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1,
                                             intermediate_size=16), len(tok), tok, 0)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def test_teacher_with_different_tokenizer(tmp_path: Path) -> None:
    foreign = _foreign_model(tmp_path / "foreign_teacher")
    d = _mini()
    d["stages"]["student"]["teachers"]["addition"] = str(foreign)
    msg = _error(tmp_path, d)
    assert "stages.student.teachers.addition" in msg and "different tokenizer" in msg


def test_unknown_domain(tmp_path: Path) -> None:
    d = _mini()
    d["domains"].append("chess")
    assert "unknown domain 'chess'" in _error(tmp_path, d)


def test_invalid_yaml(tmp_path: Path) -> None:
    assert "invalid YAML" in _error(tmp_path, "name: x\nstages: [\n")


def test_wrong_type(tmp_path: Path) -> None:
    d = _mini()
    d["stages"]["sft"]["steps"] = "many"
    assert "stages.sft.steps" in _error(tmp_path, d)


def test_alpha_needs_groups(tmp_path: Path) -> None:
    d = _mini()
    d["stages"]["student"]["group_size"] = 1
    assert "group_size >= 2" in _error(tmp_path, d)


def test_identity_changes_only_downstream(tmp_path: Path, mini_recipe: Path) -> None:
    before = stage_identities(load_recipe(mini_recipe))
    d = _mini()
    d["stages"]["teacher_rev"]["lr"] = 5e-4
    after = stage_identities(load_recipe(_write(tmp_path, d)))
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"teacher_rev", "student"}
    d["stages"]["teacher_rev"]["checkpoint_every"] = 7  # logging cadence is not identity
    assert stage_identities(load_recipe(_write(tmp_path, d))) == after


def test_dpo_reference_with_different_tokenizer(tmp_path: Path) -> None:
    """A DPO reference scores the policy's token ids: a foreign vocabulary is refused at load, one line."""
    foreign = _foreign_model(tmp_path / "foreign_reference")
    d = _mini()
    d["stages"]["prefer"] = {"kind": "dpo", "init": "sft", "steps": 1, "reference": str(foreign)}
    msg = _error(tmp_path, d)
    assert "stages.prefer.reference" in msg and "different tokenizer from the policy 'sft'" in msg
    d["stages"]["prefer"]["reference"] = "sft"  # the same lineage: accepted
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(d))
    assert "prefer" in load_recipe(tmp_path / "ok.yaml").order
