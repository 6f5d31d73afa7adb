"""Real models and real data (issue #6): data-backed domains, chat templates, placement, teacher offload, LoRA,
rollout-backend selection, the bundled Qwen recipe's validation and a miniature end-to-end run on real verifiers."""

from __future__ import annotations

import json
import random
import re
import string
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import mopd.envs.data as data_mod
from mopd.core.errors import StageError
from mopd.envs.data import DataDomain
from mopd.learner.supervised import supervised_batch
from mopd.models.checkpoint import save_checkpoint
from mopd.models.forward import sequence_logits
from mopd.models.precision import resolve_device, resolve_dtype
from mopd.models.prompting import RAW, prompt_format
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.load import RecipeError, load_recipe
from mopd.sampling.backend import choose_backend
from mopd.sampling.sampler import encode_prompts, sample
from mopd.sampling.vllm_backend import pack_batch
from mopd.teachers.panel import TeacherPanel

MINI_REAL = textwrap.dedent(
    """\
    name: mini_real
    seed: 0
    tokenizer: {alphabet: printable}
    domains:
      - {name: math, source: "bundled:math", verifier: math, eval_size: 3}
      - {name: code, source: "bundled:code", verifier: code, fields: {answer: solution}, eval_size: 2}
      - {name: instructions, source: "bundled:instructions", verifier: instructions,
         fields: {answer: example_response}, eval_size: 2}
    eval: {size: 3, max_new_tokens: 4}
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64, max_positions: 2048}
        steps: 2
        batch_size: 3
      teacher_math: {kind: rlvr, init: base, domains: [math], steps: 1, batch_size: 2, group_size: 2, max_new_tokens: 4}
      teacher_code: {kind: rlvr, init: base, domains: [code], steps: 1, batch_size: 1, group_size: 2, max_new_tokens: 4}
      teacher_if: {kind: rlvr, init: base, domains: [instructions], steps: 1, batch_size: 2, group_size: 2,
                   max_new_tokens: 4}
      student:
        kind: mopd
        init: base
        teachers: {math: teacher_math, code: teacher_code, instructions: teacher_if}
        steps: 2
        batch_size: 3
        max_new_tokens: 4
        lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}
    """
)


def _write(tmp_path: Path, data: dict | str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


def _mini() -> dict:
    return yaml.safe_load(MINI_REAL)


def _error(tmp_path: Path, data) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, data))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "r.yaml") in msg
    return msg


def _tiny(tok, seed: int = 0):
    cfg = TinyModelConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64, max_positions=256)
    return build_tiny_model(cfg, len(tok), tok, seed)


# ------------------------------------------------------------------------------------------ data domains


def test_data_domains_register_and_keep_held_out_prompts_out_of_training(tmp_path: Path) -> None:
    loaded = load_recipe(_write(tmp_path, MINI_REAL))
    assert loaded.recipe.domains == ["math", "code", "instructions"]
    for name, n_eval in (("math", 3), ("code", 2), ("instructions", 2)):
        domain = loaded.domains[name]
        assert isinstance(domain, DataDomain)
        held = domain.eval_set(100)
        assert len(held) == n_eval and domain.held_out_prompts(1) == {p.prompt for p in held}
        drawn = domain.sample_train(random.Random(0), 200)
        assert not {p.prompt for p in drawn} & domain.held_out_prompts(1)


def test_reference_completions_score_one_through_the_real_verifiers(tmp_path: Path) -> None:
    loaded = load_recipe(_write(tmp_path, MINI_REAL))
    for name in ("math", "code", "instructions"):
        domain = loaded.domains[name]
        for p in domain.eval_set(2):
            reference = f"The answer is \\boxed{{{p.answer}}}." if name == "math" else p.answer
            assert domain.verify(p, reference) == 1.0, (name, p.prompt)
            assert domain.verify(p, "no idea") < 1.0


def test_domain_column_and_value_filter_a_mixed_file(tmp_path: Path) -> None:
    rows = [{"kind": "m" if i % 2 else "x", "question": f"q{i}?", "final": str(i)} for i in range(12)]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = DataDomain("mixed_m", "mixed.jsonl", "exact", fields={"prompt": "question", "answer": "final"},
                   domain_column="kind", domain_value="m", eval_size=2, base_dir=tmp_path).load()
    train, held = d._data()
    assert len(train) + len(held) == 6 and all(int(p.prompt[1:-1]) % 2 for p in train + held)
    assert d.verify(held[0], held[0].answer) == 1.0


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"fields": {"prompt": "question"}}, "domains.0.fields.prompt"),
        ({"verifier": "code"}, "domains.0.fields.tests"),
        ({"verifier": "regex"}, "domains.0.verifier"),
        ({"source": "missing.jsonl"}, "domains.0.source"),
        ({"source": "bundled:poetry"}, "domains.0.source"),
        ({"eval_size": 40}, "domains.0.eval_size"),
        ({"domain_value": "nope"}, "domains.0.domain_value"),
        ({"colour": 1}, "domains.0.colour"),
    ],
)
def test_bad_data_domain_fails_at_load_naming_the_key(tmp_path: Path, patch: dict, where: str) -> None:
    data = _mini()
    data["domains"][0].update(patch)
    msg = _error(tmp_path, data)
    assert re.search(rf"r\.yaml:\d+: {re.escape(where)}: ", msg), msg


def test_tokenizer_alphabet_must_cover_the_data(tmp_path: Path) -> None:
    data = _mini()
    del data["tokenizer"]
    assert "printable" in _error(tmp_path, data)


def test_sft_needs_reference_completions(tmp_path: Path) -> None:
    data = _mini()
    data["domains"][1]["fields"] = {}  # code without `solution`: no reference completion
    data["stages"]["sft"] = {"kind": "sft", "init": "base", "steps": 1, "domains": ["code"]}
    assert "stages.sft.domains" in _error(tmp_path, data)


def test_machine_checks_fail_at_load(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    assert "rollout_backend" in _error(tmp_path, {**_mini(), "rollout_backend": "vllm"})
    assert ": device: " in _error(tmp_path, {**_mini(), "device": "cuda"})


def test_bundled_qwen_recipe_validates_without_downloading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a Hub id that is not cached is refused at load in one line (a run could not start); checked as a
    recipe for another machine (`check_hub=False`), the same file loads."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = Path(__file__).resolve().parents[1] / "src" / "mopd" / "recipes" / "qwen3_0.6b.yaml"
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache("Qwen/Qwen3-0.6B", "config.json"), str):
        with pytest.raises(RecipeError, match=r"qwen3_0.6b.yaml:\d+: stages\.\w+\.init: Hub model 'Qwen/Qwen3-0.6B': "
                                              "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"):
            load_recipe(path)
    loaded = load_recipe(path, check_hub=False)
    student = loaded.recipe.stages["student"]
    assert student.init == "Qwen/Qwen3-0.6B" and student.lora is not None
    assert loaded.recipe.chat_template == "auto" and loaded.recipe.dtype == "auto"


def test_bfloat16_without_hardware_support_is_warned_before_any_stage(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An AVX2-only CPU emulates bfloat16 GEMMs (the MOPD step 8x slower than float32, docs/BENCHMARKS.md): a recipe that
    asks for bfloat16 there still runs, but the runner says so, naming the stages, before the first one starts."""
    import io

    from rich.console import Console

    import mopd.execution.local_executor as local_executor
    import mopd.execution.runner as runner
    import mopd.models.precision as precision
    import mopd.recipe.resources as resources
    from mopd.recipe.resources import precision_warnings

    assert precision.emulated_bfloat16(torch.device("cuda")) is False
    data = {**_mini(), "device": "cpu"}
    data["stages"]["student"]["dtype"] = "bfloat16"
    loaded = load_recipe(_write(tmp_path, data))
    monkeypatch.setattr(resources, "emulated_bfloat16", lambda device: device.type == "cpu")
    [msg] = precision_warnings(loaded.recipe)
    assert "student" in msg and "base" not in msg and "teacher_math" not in msg and "\n" not in msg

    class Started(Exception):
        pass

    def first_stage(*args, **kwargs):
        raise Started

    monkeypatch.setattr(local_executor, "run_stage", first_stage)
    out = io.StringIO()
    with pytest.raises(StageError) as failed:  # one line per failed stage, chained to the error itself
        runner.run_recipe(loaded, tmp_path / "run", console=Console(file=out, width=400))
    assert isinstance(failed.value.__cause__, Started)
    assert "warning:" in out.getvalue() and msg in out.getvalue()

    monkeypatch.setattr(resources, "emulated_bfloat16", lambda device: False)  # AVX512 / AMX CPU, or a GPU
    assert precision_warnings(loaded.recipe) == []
    monkeypatch.setattr(resources, "emulated_bfloat16", lambda device: True)
    data["stages"]["student"].pop("dtype")  # float32 everywhere: nothing to say
    assert precision_warnings(load_recipe(_write(tmp_path, data)).recipe) == []


# ---------------------------------------------------------------------------------------- chat templates

_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def test_chat_template_renders_the_same_prompt_for_sampling_and_supervision() -> None:
    tok = build_char_tokenizer(string.printable)
    assert RAW.token_ids(tok, "2+2=") == [tok.bos_token_id, *tok("2+2=", add_special_tokens=False).input_ids]
    auto = prompt_format(tok, "auto")  # no template on the char tokenizer: raw rendering
    raw = auto.token_ids(tok, "2+2=")
    assert raw[0] == tok.bos_token_id
    tok.chat_template = _TEMPLATE
    chat_format = prompt_format(tok, "auto")
    chat = chat_format.token_ids(tok, "2+2=")
    assert tok.decode(chat) == "<user>2+2=\n<assistant>"
    ids, mask = encode_prompts(tok, ["2+2="], prompt_format=chat_format)
    assert ids[0][mask[0].bool()].tolist() == chat
    from mopd.envs import Problem

    sup_ids, sup_attn, target = supervised_batch(tok, [Problem("2+2=", "4", "x", 1)], loss_on_prompt=False,
                                                 prompt_format=chat_format)
    assert sup_ids[0][: len(chat)].tolist() == chat and target[0][: len(chat)].sum() == 0
    assert prompt_format(tok, "none").token_ids(tok, "2+2=") == raw


# ---------------------------------------------------------------------------------- placement and offload


def test_auto_placement_on_cpu_is_float32() -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU expectations")
    assert resolve_device("auto").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_auto_dtype_is_bfloat16_only_where_the_gpu_has_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pre-Ampere GPU (V100, T4) only emulates bfloat16: torch's default check says yes there, `auto` says
    float32."""
    native = {"yes": False}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native["yes"] or including_emulation)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32
    native["yes"] = True
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_offloaded_teachers_score_exactly_like_resident_ones() -> None:
    tok = build_char_tokenizer("0123456789+=")
    teachers = {"a": _tiny(tok, 1).eval(), "b": _tiny(tok, 2).eval()}
    student = _tiny(tok, 3)
    batch = sample(student, tok, ["1+2=", "3+4=", "5+6="], max_new_tokens=4,
                   generator=torch.Generator().manual_seed(0), domains=["x", "y", "x"])
    resident = TeacherPanel(models=teachers, teacher_of_domain={"x": "a", "y": "b"})
    offload = TeacherPanel(models=teachers, teacher_of_domain={"x": "a", "y": "b"},
                           compute_device=torch.device("cpu"))
    names = resident.route(batch)
    assert torch.equal(resident.sampled_logprobs(batch, names), offload.sampled_logprobs(batch, names))
    assert torch.equal(resident.full_logits(batch, names), offload.full_logits(batch, names))
    assert all(next(m.parameters()).device.type == "cpu" for m in teachers.values())  # moved back home


def test_offload_memory_benchmark_runs_its_steps_on_cpu(monkeypatch) -> None:
    """benchmarks/offload_memory.py measures the GPU memory bound of issue 6 the first time a GPU is lent; here
    its worker takes real offloaded and resident MOPD steps at the tiny shape, so it is known to run."""
    import importlib
    import sys

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    offload_memory = importlib.import_module("offload_memory")
    try:
        runs = {m: offload_memory.worker(m, "tiny", teachers=3, batch=3, new_tokens=4, steps=1)
                for m in ("offloaded", "one-teacher")}
    finally:
        sys.modules.pop("offload_memory", None)
    assert runs["offloaded"]["teachers"] == 3 and runs["one-teacher"]["teachers"] == 1
    assert runs["offloaded"]["student_mib"] == runs["one-teacher"]["student_mib"] > 0
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert all(r["device"].startswith(expected) for r in runs.values())


# ------------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_only_adapters_and_saves_a_plain_merged_model(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from mopd.core.schema import LoraSettings
    from mopd.models.lora import apply_lora, load_adapter_into

    tok = build_char_tokenizer("0123456789+=")
    settings = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = apply_lora(_tiny(tok), settings)
    ids, mask = encode_prompts(tok, ["12+3=", "4+5="])
    sequence_logits(model, ids, mask).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad():  # make the adapters non-trivial (lora_B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    expected = sequence_logits(model, ids, mask)
    save_checkpoint(tmp_path / "ckpt", model, tok, {"stage": "t"})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert not hasattr(plain, "peft_config")
    # x (W + s B A)^T against x W^T + s (x A^T) B^T: float32 rounding of two kernel paths through the model
    # (tests/rounding.py; the merge rounds each weight once more, the adapter's rank-4 sums are 4 terms); an
    # adapter merged with the wrong scale or transposed moves the logits by O(0.1)
    from .rounding import two_path_logprob_tol

    cfg = TinyModelConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)  # `_tiny`'s
    torch.testing.assert_close(sequence_logits(plain, ids, mask), expected, rtol=0,
                               atol=two_path_logprob_tol(cfg, expected))
    resumed = apply_lora(_tiny(tok), settings).eval()  # resume = starting model + saved adapter: the same
    load_adapter_into(resumed, tmp_path / "ckpt")  # computation on the same weights as `expected`
    torch.testing.assert_close(sequence_logits(resumed, ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_lora_student_projects_only_the_kept_positions_onto_the_vocabulary() -> None:
    """A peft-wrapped model still gets `logits_to_keep` (its forward hides the argument behind **kwargs)."""
    pytest.importorskip("peft")
    from mopd.core.schema import LoraSettings
    from mopd.models.lora import apply_lora

    tok = build_char_tokenizer("0123456789+=")
    model = apply_lora(_tiny(tok), LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    ids, mask = encode_prompts(tok, ["12+3=", "4+5="])
    projected: list[int] = []
    head = model.get_base_model().lm_head
    handle = head.register_forward_hook(lambda _m, inputs, _out: projected.append(inputs[0].shape[1]))
    try:
        kept = sequence_logits(model, ids, mask, logits_to_keep=2)
    finally:
        handle.remove()
    assert projected == [2]  # before the fix: the whole sequence, then sliced
    torch.testing.assert_close(kept, sequence_logits(model, ids, mask)[:, -2:])


# ------------------------------------------------------------------------------------------ rollout backend


def test_backend_selection() -> None:
    assert choose_backend("torch", cuda=True, has_vllm=True) == "torch"
    assert choose_backend("auto", cuda=True, has_vllm=True) == "vllm"
    assert choose_backend("auto", cuda=False, has_vllm=True) == "torch"
    assert choose_backend("auto", cuda=True, has_vllm=False) == "torch"
    assert choose_backend("vllm", cuda=True, has_vllm=True) == "vllm"
    with pytest.raises(ValueError, match="CUDA"):
        choose_backend("vllm", cuda=False, has_vllm=True)
    with pytest.raises(ValueError, match="not installed"):
        choose_backend("vllm", cuda=True, has_vllm=False)


def test_vllm_outputs_pack_into_the_samplers_batch_layout() -> None:
    tok = build_char_tokenizer("0123456789+=")
    model = _tiny(tok)
    ref = sample(model, tok, ["1+2=", "33+4="], max_new_tokens=5, generator=torch.Generator().manual_seed(0),
                 domains=["a", "b"], group_ids=[0, 1])
    P = encode_prompts(tok, ref.prompts)[0].shape[1]
    rows, lps = [], []
    for b in range(2):
        m = ref.completion_mask_B_T[b].bool()
        rows.append(ref.input_ids_B_T[b][m].tolist())
        lps.append(ref.sampler_logprobs_B_T[b][m].tolist())
    packed = pack_batch(tok, ref.prompts, rows, lps, eos=tok.eos_token_id, pad=tok.pad_token_id,
                        device=torch.device("cpu"), domains=["a", "b"], group_ids=[0, 1], references=None)
    assert packed.input_ids_B_T.shape[1] - max(len(r) for r in rows) == P
    for field in ("input_ids_B_T", "attention_mask_B_T", "completion_mask_B_T", "sampler_logprobs_B_T"):
        assert torch.equal(getattr(packed, field), getattr(ref, field)), field
    assert packed.completions == ref.completions and packed.domains == ref.domains


def test_vllm_engine_runs_outside_the_trainers_autocast_and_resets_its_prefix_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The in-process engine runs in the trainer's thread, inside the stage's bfloat16 autocast: it must be built,
    synced and run with CUDA autocast off, and must not reuse prompt KV cached under the previous weights. A fake
    `vllm` module records what the engine saw (CUDA autocast is a thread-local flag, settable without a GPU)."""
    import sys
    import types

    from mopd.sampling.vllm_backend import VLLMSampler

    seen: list[tuple[str, bool]] = []
    autocast = lambda: torch.is_autocast_enabled("cuda")  # noqa: E731

    class Runner:
        class model:  # noqa: N801
            @staticmethod
            def load_weights(weights):
                seen.append(("load_weights", autocast()))

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.append(("init", autocast()))

        def collective_rpc(self, fn, args):
            fn(types.SimpleNamespace(model_runner=Runner), *args)

        def reset_prefix_cache(self):
            seen.append(("reset_prefix_cache", autocast()))

        def generate(self, requests, params, use_tqdm=False):
            seen.append(("generate", autocast()))
            step = {5: types.SimpleNamespace(logprob=-0.5)}
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[5], logprobs=[step])])
                    for _ in requests]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", fake)
    tok = build_char_tokenizer("0123456789+=")
    torch.set_autocast_enabled("cuda", True)  # what `training_precision` holds around a step on a GPU
    try:
        sampler = VLLMSampler("unused", tok, dtype=torch.bfloat16, memory_fraction=0.3, seed=0)
        batch = sampler(_tiny(tok), tok, ["1+2=", "3+4="], max_new_tokens=2, generator=torch.Generator())
        still_on = autocast()
    finally:
        torch.set_autocast_enabled("cuda", False)
    assert still_on  # the trainer's own autocast is back after the call
    assert seen == [("init", False), ("load_weights", False), ("reset_prefix_cache", False), ("generate", False)]
    assert batch.sampler_logprobs_B_T[:, -1].tolist() == [-0.5, -0.5]


# --------------------------------------------------------------------------------------------- end to end


def test_miniature_real_data_recipe_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("peft")
    from mopd.execution.runner import run_recipe

    calls = {"math": 0, "code": 0, "instructions": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(data_mod, "math_reward", counting("math", data_mod.math_reward))
    monkeypatch.setattr(data_mod, "code_reward", counting("code", data_mod.code_reward))
    monkeypatch.setattr(data_mod, "instruction_reward", counting("instructions", data_mod.instruction_reward))
    loaded = load_recipe(_write(tmp_path, MINI_REAL))
    run_recipe(loaded, tmp_path / "out")
    assert all(n > 0 for n in calls.values()), calls
    student = tmp_path / "out" / "student" / "final"
    assert (student / "model.safetensors").exists() and (student / "adapter").is_dir()
    AutoModelForCausalLM.from_pretrained(student)  # a plain HF directory
    first = json.loads((tmp_path / "out" / "student" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"reward/math", "reward/code", "reward/instructions"} <= set(first)
    assert (tmp_path / "out" / "report.md").exists()
