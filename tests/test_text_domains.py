"""The real-text domains (`mopd.envs.text_domains`) and their verifiers (`mopd.verifiers.text`): hand-written
answers of every kind a chat model gives, held-out sets, and the prompted teachers' examples. No model needed."""

from __future__ import annotations

import json
import random
import re
import string

import pytest

from mopd.envs import ALPHABET, DomainError, Problem, domain_problem, get_domain, register_domain
from mopd.envs import base as envs_base
from mopd.envs.text_domains import (
    CITIES,
    LONG_WORDS,
    NAMES,
    PROMPTED,
    SHORT_WORDS,
    THINGS,
    WORDS,
    prompted_messages,
)
from mopd.verifiers.text import (
    exact_text_reward,
    json_fields_reward,
    last_number,
    last_number_reward,
    trim_reply,
)

TEXT_DOMAINS = ("caps", "word_math", "json_record")


# ------------------------------------------------------------------------------------------------ last number


@pytest.mark.parametrize(("completion", "reward"), [
    ("9 + 8 = 17", 1.0),  # the answer SmolLM2 gives: the last number is the one that counts
    ("17", 1.0),
    ("  17\n", 1.0),
    ("9 + 8 = 17.", 1.0),
    ("Mia has 9 + 8 = 17 apples now.", 1.0),
    ("Mia has 9 apples and gets 8 more, so she has 17", 1.0),
    ("17.0", 1.0),
    ("9 + 8 = 16", 0.0),
    ("17 + 1 = 18", 0.0),  # the right number, but not the last one
    ("Mia has 9 + 8 = ", 0.0),  # cut off before the answer: the last number is 8
    ("seventeen", 0.0),
    ("", 0.0),
])
def test_last_number_reward(completion, reward):
    assert last_number_reward(completion, "17") == reward


@pytest.mark.parametrize(("text", "number"), [
    ("11 - 5 = 6", 6.0),
    ("11 -5", 5.0),  # a minus after a digit is a subtraction
    ("(2+3)-4", 4.0),
    ("= -3", -3.0),
    ("The answer is -3.", -3.0),
    ("1,000 apples", 1000.0),
    ("3.5", 3.5),
    ("no number here", None),
])
def test_last_number_reads_signs_and_separators(text, number):
    assert last_number(text) == number


def test_last_number_reward_never_raises():
    assert last_number_reward(None, "3") == 0.0  # type: ignore[arg-type]
    assert last_number_reward("3", "no number") == 0.0


# ---------------------------------------------------------------------------------------------- exact text


@pytest.mark.parametrize(("completion", "reward"), [
    ("POTATO", 1.0),
    ("  POTATO \n", 1.0),
    ('"POTATO".', 1.0),
    ("'POTATO'", 1.0),
    ("The word in capital letters is POTATO.", 0.5),  # right answer inside a longer reply
    ("POTATO: POTATO", 0.5),
    ("Potato", 0.5 * (1 + 5 * 0.5) / 6),  # the letters in the wrong case: half credit each
    ("Potato: a vegetable.", 0.5 * (1 + 5 * 0.5) / 6),  # partial credit reads the reply's first word
    ('"Potato" is the word', 0.5 * (1 + 5 * 0.5) / 6),
    ('The word "potato" in capitals', 0.0),
    ("potato", 0.5 * (6 * 0.5) / 6),
    ("POTATOES", 0.5 * 6 / 8),  # too long: over the longer length
    ("POTAT", 0.5 * 5 / 6),
    ("xyz", 0.0),
    ("", 0.0),
    ("   ", 0.0),
])
def test_exact_text_reward(completion, reward):
    assert exact_text_reward(completion, "POTATO") == pytest.approx(reward)


def test_trim_reply():
    assert trim_reply('  "POTATO". ') == "POTATO"
    assert trim_reply("POTATO...") == "POTATO..."  # an ellipsis is not a full stop
    assert trim_reply("\n'A B'\n") == "A B"


def test_exact_text_reward_multi_token_answers_and_partial_credit_stays_below_half():
    assert exact_text_reward("LIGHTHOUSE", "LIGHTHOUSE") == 1.0
    assert exact_text_reward("LIGHT HOUSE", "LIGHTHOUSE") < 0.5
    assert exact_text_reward("PIZZA TUBA", "PIZZA TUBA") == 1.0
    assert exact_text_reward("PIZZA TUBA: done", "PIZZA TUBA") == 0.5
    assert exact_text_reward("PIZZA TUB", "PIZZA TUBA") == pytest.approx(0.5 * 9 / 10)
    rng = random.Random(0)
    letters = string.ascii_letters + " .:_\n"
    for _ in range(3000):  # 1.0 only for the reference alone; 0.5 at most otherwise, and only if it is there
        ref = "".join(rng.choice("AB") for _ in range(rng.randint(1, 4)))
        text = "".join(rng.choice(letters if rng.random() < 0.5 else "AB ") for _ in range(rng.randint(1, 8)))
        r = exact_text_reward(text, ref)
        assert (r == 1.0) == (trim_reply(text) == ref), (text, ref, r)
        assert r == 1.0 or r <= 0.5
        if 0.5 <= r < 1.0:
            assert ref in text, (text, ref, r)


# -------------------------------------------------------------------------------------------------- JSON

REF = '{"name": "Ivy", "age": 34}'


@pytest.mark.parametrize(("completion", "reward"), [
    ('{"name": "Ivy", "age": 34}', 1.0),
    ('  {"age": 34, "name": "Ivy"}\n', 1.0),  # key order and surrounding whitespace do not matter
    ('{\n  "name": "Ivy",\n  "age": 34\n}', 1.0),  # several lines: still the whole reply
    ('```json\n{\n  "name": "Ivy",\n  "age": 34\n}\n```', 0.5),  # a fence is not what a program can parse
    ('Here it is: {"name": "Ivy", "age": 34} Hope it helps.', 0.5),
    ('```json\n{"name": "Ivy", "age": 34}\n```\n\nThis JSON object is', 0.5),
    ('{"name": "Raj", "age": 34}', 0.5),  # one field of two
    ('{"name": "Ivy", "age": "34"}', 0.5),  # a string is not a number
    ('{"name": "Ivy", "age": 34, "city": "Oslo"}', 2 / 3),  # an extra key costs
    ('{"name": "Ivy", "age": 34.0}', 1.0),
    ('{"name": "Ivy", "age": true}', 0.5),
    ('```json\n{\n  "name": "Ivy",\n  "age"', 0.0),  # cut off: no object
    ('[{"name": "Ivy", "age": 34}]', 0.5),  # an array holding it: the object is found inside
    ("name: Ivy, age: 34", 0.0),
    ("", 0.0),
])
def test_json_fields_reward(completion, reward):
    assert json_fields_reward(completion, REF) == pytest.approx(reward)


def test_json_fields_reward_three_keys_and_bad_input():
    ref = '{"name": "Ivy", "age": 34, "city": "Oslo"}'
    assert json_fields_reward('{"name": "Ivy", "age": 34, "city": "Oslo"}', ref) == 1.0
    assert json_fields_reward('{"name": "Ivy", "age": 34}', ref) == pytest.approx(2 / 3)
    assert json_fields_reward('{"name": "Ivy", "age": 34, "city": "Lima"} and more', ref) == pytest.approx(1 / 3)
    assert json_fields_reward(None, ref) == 0.0  # type: ignore[arg-type]
    assert json_fields_reward("{{{{", ref) == 0.0


# ----------------------------------------------------------------------------------------------- domains


@pytest.mark.parametrize("name", TEXT_DOMAINS)
def test_registered_with_their_alphabet_and_length(name):
    domain = get_domain(name)
    assert domain.alphabet == string.printable
    assert domain.difficulties == (1, 2)
    assert domain.max_new_tokens in (16, 24, 32)
    assert domain.description and "\n" not in domain.description
    assert domain_problem(domain, 100, 1234) is None  # what the recipe loader checks


@pytest.mark.parametrize("name", TEXT_DOMAINS)
def test_held_out_sets_distinct_even_and_never_trained_on(name):
    domain = get_domain(name)
    for n in (100, 150):  # `caps` has 526 prompts in all: up to 180 held out, and more than 300 left to train on
        ev = domain.eval_set(n)
        assert len(ev) == n and len({p.prompt for p in ev}) == n
        assert abs([p.difficulty for p in ev].count(1) - n // 2) <= 2
        assert ev == domain.eval_set(n)  # fixed
    held = domain.held_out_prompts(100)
    train = domain.sample_train(random.Random(0), 3000, exclude=held)
    assert not {p.prompt for p in train} & held
    assert len({p.prompt for p in train}) > 250  # room to train beyond the held-out set


@pytest.mark.parametrize("name", TEXT_DOMAINS)
def test_references_score_one_and_answers_are_right(name):
    domain = get_domain(name)
    rng = random.Random(1)
    for d in domain.difficulties:
        for _ in range(200):
            p = domain.sample(rng, d)
            assert domain.verify(p, p.answer) == 1.0
            assert domain.verify(p, "") == 0.0
            answer, difficulty, words = _solve(name, p.prompt)
            assert p.answer == answer and p.difficulty == difficulty
            assert words <= set(WORDS) | set(NAMES) | set(THINGS) | set(CITIES)


def _solve(name: str, prompt: str) -> tuple[str, int, set[str]]:
    """(the answer, the difficulty, the list words used) read back from a prompt of domain `name`."""
    if name == "caps":
        word = re.fullmatch(r"Write the word '([a-z]+)' in capital letters\.", prompt).group(1)
        return word.upper(), 1 if len(word) <= 6 else 2, {word}
    if name == "word_math":
        m = re.fullmatch(r"(\w+) has (\d+) (\w+) and (gets|gives away) (\d+)( more)?\. How many \3 does \1 have now\? "
                         r"Answer with a number\.", prompt)
        a, b, add = int(m.group(2)), int(m.group(5)), m.group(4) == "gets"
        return str(a + b if add else a - b), 1 if add else 2, {m.group(1), m.group(3)}
    two = re.fullmatch(r'Write a JSON object with the keys "name" and "age" for (\w+), who is (\d+) years old\.', prompt)
    if two:
        return json.dumps({"name": two.group(1), "age": int(two.group(2))}), 1, {two.group(1)}
    m = re.fullmatch(r'Write a JSON object with the keys "name", "age" and "city" for (\w+), who is (\d+) years old '
                     r"and lives in (\w+)\.", prompt)
    return json.dumps({"name": m.group(1), "age": int(m.group(2)), "city": m.group(3)}), 2, {m.group(1), m.group(3)}


def test_word_lists_are_clean():
    for items in (WORDS, NAMES, THINGS, CITIES):
        assert len(set(items)) == len(items)
    assert all(w.isalpha() and w.islower() for w in WORDS)
    assert len(SHORT_WORDS) >= 200 and len(LONG_WORDS) >= 200
    assert all(3 <= len(w) <= 6 for w in SHORT_WORDS) and all(7 <= len(w) <= 10 for w in LONG_WORDS)
    assert set(SHORT_WORDS) | set(LONG_WORDS) == set(WORDS)


# ------------------------------------------------------------------------------------------ prompted teachers


@pytest.mark.parametrize("name", TEXT_DOMAINS)
def test_prompted_examples_are_right_and_never_held_out_or_trained_on(name):
    domain = get_domain(name)
    spec = PROMPTED[name]
    assert spec["system"] and len(spec["examples"]) >= 2
    held = domain.held_out_prompts(150)
    train = {p.prompt for p in domain.sample_train(random.Random(0), 3000)}
    for ex in spec["examples"]:
        assert ex["prompt"] not in held and ex["prompt"] not in train
        answer, _, words = _solve(name, ex["prompt"])  # the example is a prompt of the domain's own form
        assert not words & (set(WORDS) | set(NAMES) | set(CITIES))  # with words the generator never uses
        p = Problem(prompt=ex["prompt"], answer=answer, domain=name, difficulty=1)
        assert domain.verify(p, ex["answer"]) == 1.0  # and the answer it shows is right
    messages = prompted_messages(name, "PROMPT")
    assert messages[0] == {"role": "system", "content": spec["system"]}
    assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * len(spec["examples"]) + ["user"]
    assert messages[-1]["content"] == "PROMPT"


# ------------------------------------------------------------------------------------- the alphabet on Domain


@pytest.fixture
def clean_registry():
    saved = dict(envs_base._REGISTRY)
    yield
    envs_base._REGISTRY.clear()
    envs_base._REGISTRY.update(saved)


def test_a_domain_keeps_the_character_alphabet_unless_it_names_its_own(clean_registry):
    @register_domain("t_plain", difficulties=(1,))
    def plain(rng, d):
        return f"Say {rng.randint(0, 9999)}!", "X"

    @register_domain("t_text", difficulties=(1,), alphabet=string.printable)
    def text(rng, d):
        return f"Say {rng.randint(0, 9999)}!", "X"

    assert get_domain("t_plain").alphabet == ALPHABET
    with pytest.raises(DomainError, match="outside ALPHABET"):
        get_domain("t_plain").sample(random.Random(0))
    assert get_domain("t_text").sample(random.Random(0)).answer == "X"

    @register_domain("t_text_bad", difficulties=(1,), alphabet=string.ascii_letters)
    def text_bad(rng, d):
        return "Say ü", "X"

    with pytest.raises(DomainError, match="outside its alphabet"):
        get_domain("t_text_bad").sample(random.Random(0))
    with pytest.raises(ValueError, match="alphabet"):
        register_domain("t_empty", alphabet="")
