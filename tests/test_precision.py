"""Mixed precision (issue #6): a stage that computes in bfloat16 keeps the weights it trains in float32.

Why it matters: the bundled Qwen recipe trains at lr 1e-6 in bfloat16. A bfloat16 weight of 0.02 moves only in
steps of about 1e-4, so AdamW updates of 1e-6 round away and the stage silently does not train. These tests run
the real stages on CPU (autocast works there too) and check what the GPU path relies on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from mopd.core.schema import LoraSettings
from mopd.execution.runner import run_recipe
from mopd.models.precision import compute_precision, resolve_placement, training_attention
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.identity import stage_identities
from mopd.recipe.load import load_recipe

from .mini_compare import recipe

STAGES = """\
sft_master: {kind: sft, init: base, steps: 3, batch_size: 12, lr: 1.0e-6, dtype: bfloat16}
sft_pure: {kind: sft, init: base, steps: 3, batch_size: 12, lr: 1.0e-6, dtype: bfloat16, master_weights: same}
student:
  kind: mopd
  init: sft
  teachers: {reversal: teacher_rev, sorting: teacher_sort}
  steps: 2
  batch_size: 4
  max_new_tokens: 6
  dtype: bfloat16
  objective: full_reverse_kl
"""


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(stage_dir / "final" / "model.safetensors")


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    """Fraction of the matrix entries that differ from `before` (compared in `dtype`)."""
    keys = [k for k, v in before.items() if v.dim() == 2]
    changed = sum(int((after[k].to(dtype) != before[k].to(dtype)).sum()) for k in keys)
    return changed / sum(before[k].numel() for k in keys)


def test_bfloat16_stage_trains_float32_master_weights_and_pure_bfloat16_loses_updates(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(recipe(STAGES))
    loaded = load_recipe(tmp_path / "r.yaml")
    run_recipe(loaded, tmp_path / "run", Console(quiet=True))
    base = _weights(tmp_path / "run" / "base")
    master, pure = _weights(tmp_path / "run" / "sft_master"), _weights(tmp_path / "run" / "sft_pure")

    # default (master_weights: float32): wide weights saved, and nearly every entry took its 1e-6 updates
    assert all(v.dtype == torch.float32 for v in master.values())
    assert _moved(base, master, torch.float32) > 0.9
    # master_weights: same: bfloat16 weights, and most updates rounded away (the failure the default avoids)
    assert all(v.dtype == torch.bfloat16 for v in pure.values())
    assert _moved(base, pure, torch.bfloat16) < 0.2

    # the MOPD path (sampler, bfloat16 teachers, distillation loss) runs under autocast and trains float32 weights
    student = _weights(tmp_path / "run" / "student")
    assert all(v.dtype == torch.float32 for v in student.values())
    assert _moved(_weights(tmp_path / "run" / "sft"), student, torch.float32) > 0.5


def test_master_weights_default_keeps_stage_identities(tmp_path: Path) -> None:
    """Adding the key changed no identity of a recipe that does not set it (finished runs stay cached);
    setting it to `same` does change the identity."""
    ids = []
    for i, extra in enumerate(("", "master_weights: float32\n", "master_weights: same\n")):
        (tmp_path / f"{i}.yaml").write_text(extra + recipe(""))
        ids.append(stage_identities(load_recipe(tmp_path / f"{i}.yaml")))
    assert ids[0] == ids[1]
    assert all(ids[0][k] != ids[2][k] for k in ids[0])


def test_compute_precision_autocasts_only_when_weights_are_wider() -> None:
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    cpu = torch.device("cpu")
    with compute_precision(cpu, torch.bfloat16, torch.float32):
        assert lin(x).dtype == torch.bfloat16
    with compute_precision(cpu, torch.float32, torch.float32):
        assert lin(x).dtype == torch.float32

    class Stage:
        master_weights = None

    class RecipeStub:
        device = "cpu"
        dtype = "bfloat16"
        master_weights = "float32"
        teacher_device = "auto"

    placement = resolve_placement(Stage(), RecipeStub())
    assert placement.compute_dtype == torch.bfloat16 and placement.weights_dtype == torch.float32
    Stage.master_weights = "same"
    assert resolve_placement(Stage(), RecipeStub()).weights_dtype == torch.bfloat16


def test_bfloat16_training_on_cpu_uses_eager_attention_and_other_placements_keep_sdpa() -> None:
    tok = build_char_tokenizer("0123456789+=")
    cfg = TinyModelConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)
    cpu = torch.device("cpu")
    fast = training_attention(build_tiny_model(cfg, len(tok), tok, seed=0), cpu, torch.bfloat16)
    kept = training_attention(build_tiny_model(cfg, len(tok), tok, seed=0), cpu, torch.float32)
    assert fast.config._attn_implementation == "eager"
    assert kept.config._attn_implementation == "sdpa"


def test_lora_on_a_bfloat16_base_trains_float32_adapters() -> None:
    pytest.importorskip("peft")
    from mopd.models.lora import apply_lora, merged_copy

    tok = build_char_tokenizer("0123456789+=")
    cfg = TinyModelConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)
    model = apply_lora(build_tiny_model(cfg, len(tok), tok, seed=0).to(torch.bfloat16),
                       LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), adapter_dtype=torch.float32)
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    ids = torch.tensor([tok("12+3=").input_ids])
    with compute_precision(torch.device("cpu"), torch.bfloat16, torch.float32):
        loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    merged = merged_copy(model)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())


def test_placing_a_model_in_bfloat16_keeps_its_float32_rope_frequencies(tmp_path: Path) -> None:
    """`load_placed` in bfloat16 must give the model `from_pretrained(dtype=bfloat16)` gives (the teachers' and any
    inference stack's): transformers keeps RoPE's `inv_freq` in float32, and a blanket `.to(bfloat16)` rounded it,
    shifting every rotary angle; the logits of a long row then differ."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from mopd.stages.loading import load_placed, placed

    tok = build_char_tokenizer("0123456789+=")
    cfg = TinyModelConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64, max_positions=256)
    build_tiny_model(cfg, len(tok), tok, seed=0).save_pretrained(tmp_path)
    where = SimpleNamespace(device="cpu", dtype="bfloat16", master_weights="float32", teacher_device="auto")
    ctx = SimpleNamespace(placement=resolve_placement(where, where))
    model = load_placed(ctx, tmp_path).eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.tensor([[int(i) % len(tok) for i in range(4, 204)]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    # a model built in float32 and placed in bfloat16 (a from-scratch or LoRA base) keeps them too
    built = placed(ctx, build_tiny_model(cfg, len(tok), tok, seed=0))
    assert built.model.rotary_emb.inv_freq.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in built.parameters())
