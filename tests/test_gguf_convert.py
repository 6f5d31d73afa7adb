"""GGUF files as Hugging Face directories: the converted model is the GGUF's model, a `gguf:` reference converts
once and is reused, and a file or directory that cannot be used is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mopd.core.errors import RecipeError
from mopd.models.gguf import GGUFError, cached_conversion, convert_gguf, find_gguf, source_of

from .conftest import SMOL_GGUF


def test_the_converted_directory_is_the_gguf_model(smol_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = find_gguf(SMOL_GGUF)
    names = {p.name for p in smol_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
            "mopd.json"} <= names
    assert source_of(smol_dir)["sha256"] and "GGUF file" in (smol_dir / "README.md").read_text()
    tok = AutoTokenizer.from_pretrained(smol_dir)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert "quantization_config" not in json.loads((smol_dir / "config.json").read_text())
    # the weights are the file's, dequantized by the `gguf` package itself (not by transformers' loader)
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    tensors = {t.name: t for t in GGUFReader(src).tensors}
    with safe_open(smol_dir / "model.safetensors", "pt") as f:
        for ours, theirs in (("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
                             ("model.layers.29.mlp.up_proj.weight", "blk.29.ffn_up.weight"),
                             ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
                             ("model.norm.weight", "output_norm.weight")):
            t = tensors[theirs]
            want = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32"))
            assert torch.equal(f.get_tensor(ours), want.reshape(f.get_tensor(ours).shape)), ours
    model = AutoModelForCausalLM.from_pretrained(smol_dir)
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    # a second reference to the same file reuses the conversion
    assert cached_conversion(SMOL_GGUF) == smol_dir


def test_a_corrupt_conversion_is_one_line_at_load(smol_dir: Path, tmp_path: Path):
    import shutil

    from mopd.recipe.load import load_recipe

    copy = tmp_path / "smol"
    shutil.copytree(smol_dir, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\ndomains: [addition]\nstages:\n  t:\n    kind: rlvr\n    init: {copy}\n    steps: 1\n")
    with pytest.raises(RecipeError, match=r"r.yaml:6: stages.t.init: .*model.safetensors: 1000 bytes"):
        load_recipe(recipe)


def test_files_that_are_not_models_are_one_line(tmp_path: Path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        convert_gguf(text, tmp_path / "out")
    odd = tmp_path / "odd.gguf"  # a valid GGUF of an architecture transformers does not map
    w = gguf.GGUFWriter(str(odd), "rwkv9")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="cannot load this GGUF as a causal LM .*rwkv9"):
        convert_gguf(odd, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(GGUFError, match="no installed package 'no_such_pkg'"):
        find_gguf("gguf:no_such_pkg/model.gguf")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ndomains: [addition]\nstages:\n  t:\n    kind: rlvr\n    init: gguf:odd.gguf\n"
                      "    steps: 1\n")
    from mopd.recipe.load import load_recipe

    with pytest.raises(RecipeError, match=r"r.yaml:6: stages.t.init: .*rwkv9"):
        load_recipe(recipe)


def test_mopd_convert_cli(tmp_path: Path):
    from typer.testing import CliRunner

    from mopd.cli import app

    res = CliRunner().invoke(app, ["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "out")])
    assert res.exit_code == 2 and "no such file" in res.output and len(res.output.strip().splitlines()) == 1
