"""The testbed's byte-level BPE (`models.tokenizer.build_bpe_tokenizer`) and the recipe's `tokenizer: {kind: bpe}`:
determinism, round trip, offsets, a BPE teacher pipeline that trains and saves its tokenizer, and the load-time
rule that a teacher of another tokenizer needs `cross_tokenizer: true` (issue 37)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from mopd.core.errors import RecipeError
from mopd.envs import ALPHABET
from mopd.execution.runner import run_recipe
from mopd.models.checkpoint import load_tokenizer
from mopd.models.tokenizer import (
    SPECIAL_TOKENS,
    build_bpe_tokenizer,
    build_char_tokenizer,
    tokenizer_fingerprint,
)
from mopd.recipe.identity import stage_identities
from mopd.recipe.load import load_recipe
from mopd.recipe.memory_check import stage_parameters, tiny_parameters
from mopd.recipe.tokenizer import bpe_corpus, scratch_tokenizer, tokenizer_settings

# two tiny pipelines from scratch, a character one (the recipe's tokenizer) and a BPE one (its pretrain stage's own)
PIPELINES = textwrap.dedent(
    """\
    name: xtok
    seed: 0
    domains: [reversal, sorting, shift]
    eval: {size: 12, max_new_tokens: 8}
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
        steps: 2
        batch_size: 8
      sft: {kind: sft, init: base, steps: 2, batch_size: 8}
      base_bpe:
        kind: pretrain
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
        tokenizer: {kind: bpe, vocab_size: 96}
        steps: 2
        batch_size: 8
      sft_bpe: {kind: sft, init: base_bpe, steps: 2, batch_size: 8}
      teacher_reversal_bpe: {kind: rlvr, init: sft_bpe, domains: [reversal], steps: 2, batch_size: 2, group_size: 2}
    """
)
STUDENT = {"kind": "mopd", "init": "sft", "steps": 2, "batch_size": 2}


def _write(tmp_path: Path, text: str, name: str = "r.yaml", **stages) -> Path:
    data = yaml.safe_load(text)
    data["stages"].update(stages)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_recipe(_write(tmp_path_factory.mktemp("xtok"), PIPELINES))


@pytest.fixture(scope="module")
def bpe(loaded):
    return scratch_tokenizer(loaded.recipe, tokenizer_settings(loaded.recipe, "sft_bpe"), loaded.domains)


def test_bpe_has_the_char_tokenizers_special_tokens_padding_and_alphabet(bpe) -> None:
    char = build_char_tokenizer(ALPHABET)
    assert [bpe.convert_ids_to_tokens(i) for i in range(4)] == list(SPECIAL_TOKENS)
    assert (bpe.pad_token_id, bpe.bos_token_id, bpe.eos_token_id, bpe.unk_token_id) == (0, 1, 2, 3)
    assert bpe.special_tokens_map == char.special_tokens_map and bpe.padding_side == "left"
    assert len(bpe) == 96  # the corpus has pairs to spare: the trainer stops at vocab_size
    for ch in ALPHABET:  # every character of the alphabet is one token of its own, merges or not
        ids = bpe(ch, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != bpe.unk_token_id
    assert tokenizer_fingerprint(bpe) != tokenizer_fingerprint(char)


def test_bpe_round_trip_offsets_and_never_more_tokens_than_characters(loaded, bpe) -> None:
    """decode(encode(x)) == x; each token's offsets cover exactly its characters, end to end; and a text is at
    most as many tokens as characters (why eval's recipe-wide `max_new_tokens`, set in characters, is enough)."""
    texts = bpe_corpus(loaded.recipe, loaded.domains)[:600] + ["rev:abc= cba", "3+4=7", "shift:zz=aa"]
    merged = 0
    for text in texts:
        enc = bpe(text, add_special_tokens=False, return_offsets_mapping=True)
        assert bpe.decode(enc.input_ids) == text
        assert len(enc.input_ids) <= len(text)
        merged += len(enc.input_ids) < len(text)
        spans = enc.offset_mapping
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert [bpe.decode([i]) for i in enc.input_ids] == [text[s:e] for s, e in spans]
    assert merged > len(texts) // 2  # it is a sub-word tokenizer: most texts are fewer tokens than characters


def _bpe_json(corpus: Path, env: dict[str, str]) -> str:
    """The BPE of the texts in `corpus` (a JSON list), built in a fresh process under `env`, as JSON."""
    code = textwrap.dedent(
        f"""\
        import json
        from mopd.envs import ALPHABET
        from mopd.models.tokenizer import build_bpe_tokenizer
        texts = json.loads(open({str(corpus)!r}).read())
        print(build_bpe_tokenizer(texts, ALPHABET, 96).backend_tokenizer.to_str())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout


def test_bpe_vocabulary_is_the_same_across_processes_hash_seeds_and_threads(tmp_path, loaded, bpe) -> None:
    """The trainer's ties are broken by symbol ids, not by hash order or thread scheduling, and the corpus is
    drawn from a fixed seed: a process with another hash seed and tokenizers' parallelism off builds byte for byte
    the vocabulary and merges of this one."""
    corpus = bpe_corpus(loaded.recipe, loaded.domains)
    again = scratch_tokenizer(loaded.recipe, tokenizer_settings(loaded.recipe, "base_bpe"), loaded.domains)
    assert bpe_corpus(loaded.recipe, loaded.domains) == corpus
    assert again.backend_tokenizer.to_str() == bpe.backend_tokenizer.to_str()
    (tmp_path / "corpus.json").write_text(json.dumps(corpus))
    other = _bpe_json(tmp_path / "corpus.json", {"PYTHONHASHSEED": "12345", "TOKENIZERS_PARALLELISM": "false",
                                                 "RAYON_NUM_THREADS": "1"})
    assert json.loads(other) == json.loads(bpe.backend_tokenizer.to_str())
    # and the corpus decides it: the same settings on the reversal prompts alone merge other pairs
    assert tokenizer_fingerprint(build_bpe_tokenizer(corpus[:4000], ALPHABET, 96)) != tokenizer_fingerprint(bpe)


def test_fingerprint_tells_merges_apart() -> None:
    """Two BPEs of one vocabulary but merges in another order make other ids of one text: fingerprints differ."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, "a", "b", "c", "ab", "bc"])}
    a, b = (PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, merges)))
            for merges in ([("a", "b"), ("b", "c")], [("b", "c"), ("a", "b")]))
    assert a.get_vocab() == b.get_vocab() and a("abc").input_ids != b("abc").input_ids
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    char = build_char_tokenizer("abc")  # no merges: hashed as before merges entered the fingerprint
    assert tokenizer_fingerprint(char) == tokenizer_fingerprint(build_char_tokenizer("cba"))


def test_bpe_pipeline_trains_and_its_checkpoints_carry_the_bpe(tmp_path, loaded, bpe) -> None:
    """pretrain -> sft -> rlvr on a BPE beside a character pipeline: every checkpoint reloads its own tokenizer
    (the same fingerprint as built from the recipe), and the eval scored every domain."""
    out = tmp_path / "run"
    run_recipe(loaded, out, Console(quiet=True))
    char_fp = tokenizer_fingerprint(build_char_tokenizer(ALPHABET))
    for stage in ("base_bpe", "sft_bpe", "teacher_reversal_bpe"):
        reloaded = load_tokenizer(out / stage / "final")
        assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(bpe) and reloaded.padding_side == "left"
        records = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert all(f"eval/{d}" in records[-1] for d in ("reversal", "sorting", "shift"))
    for stage in ("base", "sft"):
        assert tokenizer_fingerprint(load_tokenizer(out / stage / "final")) == char_fp


def test_identity_holds_the_bpe_settings_of_the_stages_that_use_them(tmp_path, loaded) -> None:
    ids = stage_identities(loaded)
    text = PIPELINES.replace("vocab_size: 96", "vocab_size: 97")
    other = stage_identities(load_recipe(_write(tmp_path, text), check_tokenizers=False))
    assert all(other[s] != ids[s] for s in ("base_bpe", "sft_bpe", "teacher_reversal_bpe"))
    assert all(other[s] == ids[s] for s in ("base", "sft"))
    # the default tokenizer, spelled out, is the one every finished stage was saved under
    spelled = PIPELINES.replace("eval: {size: 12", "tokenizer: {kind: char}\neval: {size: 12")
    assert stage_identities(load_recipe(_write(tmp_path, spelled, "s.yaml"), check_tokenizers=False)) == ids


def test_the_memory_check_counts_each_scratch_models_own_vocabulary(loaded) -> None:
    """A BPE model's embedding has `vocab_size` rows (at most), a character model's one per token."""
    counts = stage_parameters(loaded.recipe, loaded.order, loaded.path.parent)
    cfg = loaded.recipe.stages["base"].model
    assert counts["base"] == tiny_parameters(cfg, len(build_char_tokenizer(ALPHABET)))
    assert counts["sft_bpe"] == counts["base_bpe"] == tiny_parameters(cfg, 96) != counts["base"]


def test_a_bpe_teacher_of_a_char_student_needs_cross_tokenizer(tmp_path) -> None:
    """Without the opt-in: one line naming the teacher's key; with it: the recipe loads (the stage itself is the
    cross-tokenizer scorer's); a teacher of the student's own tokenizer never needed it."""
    plain = dict(STUDENT, teachers={"reversal": "teacher_reversal_bpe"}, domains=["reversal"])
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, PIPELINES, student=plain))
    msg = str(e.value)
    assert "\n" not in msg and "stages.student.teachers.reversal" in msg and "teacher_reversal_bpe" in msg
    assert "cross_tokenizer: true" in msg
    opted = dict(plain, teachers={"reversal": {"stage": "teacher_reversal_bpe", "cross_tokenizer": True}})
    loaded = load_recipe(_write(tmp_path, PIPELINES, student=opted))
    assert loaded.recipe.stages["student"].cross_tokenizer == ["teacher_reversal_bpe"]
    # a mixed panel: the opt-in of one teacher is not another's (`sft_bpe` is BPE too and did not opt in)
    mixed = dict(STUDENT, teachers={"reversal": {"stage": "teacher_reversal_bpe", "cross_tokenizer": True},
                                    "sorting": "sft_bpe", "shift": "sft"})
    with pytest.raises(RecipeError, match="stages.student.teachers.sorting"):
        load_recipe(_write(tmp_path, PIPELINES, student=mixed))


@pytest.mark.parametrize(("stages", "key", "says"), [
    ({"base": {"kind": "pretrain", "model": {"hidden_size": 32}, "steps": 2, "tokenizer": {"vocab_size": 64}}},
     "stages.base.tokenizer.vocab_size", "only a `kind: bpe` tokenizer"),
    ({"sft": {"kind": "pretrain", "init": "base", "steps": 2, "tokenizer": {"kind": "bpe"}}},
     "stages.sft.tokenizer", "keeps its start's"),
    # 4 special tokens + the 43 characters of the domains' alphabet: no merge would fit
    ({"base_bpe": {"kind": "pretrain", "model": {"hidden_size": 32}, "steps": 2,
                   "tokenizer": {"kind": "bpe", "vocab_size": 47}}},
     "stages.base_bpe.tokenizer.vocab_size", "leave no room for merges"),
])
def test_tokenizer_settings_that_cannot_apply_are_one_line(tmp_path, stages, key, says) -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, PIPELINES, **stages))
    assert "\n" not in str(e.value) and key in str(e.value) and says in str(e.value)
