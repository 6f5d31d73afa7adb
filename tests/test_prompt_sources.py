"""Prompt loading from JSONL / JSON / parquet / datasets directories, and the bundled prompt sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mopd.data import BUNDLED, PromptRecord, bundled_path, load_prompts
from mopd.verifiers import code_reward, instruction_reward, math_reward, validate_constraints

ROWS = [
    {"domain": "math", "prompt": "What is 2 + 3?", "answer": "5", "id": "m1"},
    {
        "domain": "code",
        "prompt": "Write inc(x).",
        "tests": ["assert inc(1) == 2", "assert inc(-1) == 0"],
        "id": "c1",
    },
    {
        "domain": "instructions",
        "prompt": "Say hi in lowercase, at most 3 words.",
        "constraints": [
            {"type": "all_lowercase"},
            {"type": "max_words", "n": 3},
            {"type": "forbidden_words", "words": ["hello"]},
        ],
        "id": "i1",
    },
]

EXPECTED = [
    PromptRecord("What is 2 + 3?", "math", "5", {"id": "m1"}),
    PromptRecord(
        "Write inc(x).", "code", None, {"tests": ["assert inc(1) == 2", "assert inc(-1) == 0"], "id": "c1"}
    ),
    PromptRecord(
        "Say hi in lowercase, at most 3 words.",
        "instructions",
        None,
        {
            "constraints": [
                {"type": "all_lowercase"},
                {"type": "max_words", "n": 3},
                {"type": "forbidden_words", "words": ["hello"]},
            ],
            "id": "i1",
        },
    ),
]


def _columnar(rows):
    """Rows with the union of keys (absent -> None), as any columnar store holds them."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_and_json(tmp_path):
    assert load_prompts(_write_jsonl(tmp_path / "p.jsonl", ROWS)) == EXPECTED
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    assert load_prompts(tmp_path / "p.json") == EXPECTED
    assert load_prompts(str(tmp_path / "p.jsonl"), limit=2) == EXPECTED[:2]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(_columnar(ROWS)), path)
    assert load_prompts(path) == EXPECTED
    assert load_prompts(path, limit=1) == EXPECTED[:1]
    other = tmp_path / "p.data"
    other.write_bytes(path.read_bytes())
    assert load_prompts(other, format="parquet") == EXPECTED


def test_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    ds = datasets.Dataset(pa.Table.from_pylist(_columnar(ROWS)))
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(tmp_path / "ds") == EXPECTED
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert load_prompts(tmp_path / "dd") == EXPECTED
    assert load_prompts(tmp_path / "dd", split="test") == EXPECTED[:1]
    assert load_prompts(tmp_path / "dd", format="datasets", limit=2) == EXPECTED[:2]
    with pytest.raises(ValueError, match="no split 'validation'; available splits: train, test"):
        load_prompts(tmp_path / "dd", split="validation")


def test_field_map_and_domain(tmp_path):
    rows = [{"question": "Write inc(x).", "checks": ["assert inc(1) == 2"], "gold": 7, "kind": "code"}]
    path = _write_jsonl(tmp_path / "custom.jsonl", rows)
    (rec,) = load_prompts(
        path, field_map={"prompt": "question", "tests": "checks", "reference": "gold"}, domain="code"
    )
    assert rec == PromptRecord(
        "Write inc(x).", "code", "7", {"tests": ["assert inc(1) == 2"], "kind": "code"}
    )
    (rec,) = load_prompts(path, field_map={"prompt": "question"}, domain_column="kind")
    assert rec.domain == "code" and rec.reference is None and "kind" not in rec.meta
    # An explicit domain column wins over the constant; the constant wins over a plain 'domain' column.
    (rec,) = load_prompts(path, field_map={"prompt": "question", "domain": "kind"}, domain="other")
    assert rec.domain == "code"
    (rec,) = load_prompts(_write_jsonl(tmp_path / "d.jsonl", ROWS[:1]), domain="arith")
    assert rec.domain == "arith"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"bad\.jsonl:2: missing column 'prompt'; columns: question, domain"),
        ({"field_map": {"prompt": "q"}}, r"bad\.jsonl:1: missing column 'q' \(mapped from 'prompt'\)"),
        ({"field_map": {"prompt": "question", "tests": "checks"}}, r"bad\.jsonl:1: missing column 'checks'"),
        (
            {"field_map": {"prompt": "question"}, "domain_column": "topic"},
            r"bad\.jsonl:1: missing column 'topic'",
        ),
        ({"field_map": {"question": "prompt"}}, r"field_map: unknown field"),
    ],
)
def test_missing_column_errors(tmp_path, kwargs, message):
    rows = [
        {"prompt": "ok", "question": "ok", "domain": "math"},
        {"question": "no prompt here", "domain": "math"},
    ]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message) as err:
        load_prompts(path, **kwargs)
    assert "\n" not in str(err.value)


def test_other_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="relative/nope.parquet"):
        load_prompts("relative/nope.parquet")  # not mistaken for a Hub id
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "domain": "x"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
        load_prompts(tmp_path / "broken.jsonl")
    _write_jsonl(tmp_path / "nodomain.jsonl", [{"prompt": "a"}])
    with pytest.raises(ValueError, match=r"nodomain\.jsonl:1: missing column 'domain'; pass domain="):
        load_prompts(tmp_path / "nodomain.jsonl")
    _write_jsonl(
        tmp_path / "rule.jsonl",
        [{"prompt": "a", "domain": "instructions", "constraints": [{"type": "max_wordz", "n": 3}]}],
    )
    with pytest.raises(ValueError, match=r"rule\.jsonl:1: constraint 0: unknown type 'max_wordz'"):
        load_prompts(tmp_path / "rule.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_prompts(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="unknown format"):
        load_prompts(tmp_path / "x.txt", format="csv")
    with pytest.raises(ValueError, match="unknown bundled prompt set"):
        load_prompts("bundled:poetry")


# ------------------------------------------------------------------------------------------- bundled


def test_bundled_sets_load():
    sizes = {name: len(load_prompts(f"bundled:{name}")) for name in BUNDLED}
    assert sizes["math"] >= 40 and sizes["code"] >= 20 and sizes["instructions"] >= 30
    for name in BUNDLED:
        assert bundled_path(name).is_file()
        records = load_prompts(bundled_path(name))
        assert {r.domain for r in records} == {name}
        assert len({r.prompt for r in records}) == len(records)


def test_bundled_math_answers_verify():
    for rec in load_prompts("bundled:math"):
        assert rec.reference, rec
        assert "\\boxed{}" in rec.prompt
        assert (
            math_reward(f"Working... so the answer is \\boxed{{{rec.reference}}}.", rec.reference) == 1.0
        ), rec
        assert math_reward(rec.reference, rec.reference) == 1.0, rec


def test_bundled_code_solutions_pass():
    for rec in load_prompts("bundled:code"):
        tests = rec.meta["tests"]
        assert isinstance(tests, list) and len(tests) >= 3
        completion = f"Here you go:\n```python\n{rec.meta['solution']}\n```"
        assert code_reward(completion, tests) == 1.0, rec.meta["entry_point"]
        assert code_reward("def nothing():\n    pass", tests) == 0.0


def test_bundled_instruction_constraints_validate_and_are_satisfiable():
    for rec in load_prompts("bundled:instructions"):
        validate_constraints(rec.meta["constraints"])
        assert instruction_reward(rec.meta["example_response"], rec.meta["constraints"]) == 1.0, rec.prompt
