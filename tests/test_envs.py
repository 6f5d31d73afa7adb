"""Tests for the synthetic verifiable domains, the reward and the domain registry."""

from __future__ import annotations

import random
import textwrap
from collections import Counter

import pytest

from mopd.envs import (
    ALPHABET,
    Domain,
    DomainError,
    Problem,
    exact_match,
    get_domain,
    list_domains,
    load_plugin,
    partial_match_reward,
    register_domain,
)
from mopd.envs import base as envs_base

BUILTINS = ("addition", "multiplication", "reversal", "sorting", "caesar")


@pytest.fixture
def clean_registry():
    saved = dict(envs_base._REGISTRY)
    yield
    envs_base._REGISTRY.clear()
    envs_base._REGISTRY.update(saved)


def _prob(answer: str) -> Problem:
    return Problem(prompt="x=", answer=answer, domain="t", difficulty=1)


def _expected(domain: str, prompt: str) -> str:
    assert prompt.endswith("=")
    body = prompt[:-1]
    if domain == "addition":
        a, b = body.split("+")
        return str(int(a) + int(b))
    if domain == "multiplication":
        a, b = body.split("*")
        return str(int(a) * int(b))
    if domain == "reversal":
        assert body.startswith("rev:")
        return "".join(reversed(body[4:]))
    if domain == "sorting":
        assert body.startswith("sort:")
        return "".join(sorted(body[5:]))
    if domain == "caesar":
        assert body.startswith("rot") and body[4] == ":" and body[3] in "12345"
        k = int(body[3])
        return "".join("abcdefghijklmnopqrstuvwxyz"[("abcdefghijklmnopqrstuvwxyz".index(c) + k) % 26] for c in body[5:])
    raise AssertionError(domain)


def _operand_digits(prompt: str, op: str) -> list[int]:
    return [len(x) for x in prompt[:-1].split(op)]


def test_builtins_registered():
    names = list_domains()
    for name in BUILTINS:
        assert name in names
        dom = get_domain(name)
        assert isinstance(dom, Domain)
        assert dom.difficulties == (1, 2, 3)
        assert dom.description and "\n" not in dom.description
        assert dom.verify.__wrapped__ is partial_match_reward


def test_alphabet():
    assert len(set(ALPHABET)) == len(ALPHABET)
    assert set(ALPHABET) == set("0123456789abcdefghijklmnopqrstuvwxyz+*=:,- ")


@pytest.mark.parametrize("name", BUILTINS)
def test_generators_deterministic_per_seed(name):
    dom = get_domain(name)
    assert dom.sample(random.Random(7)) == dom.sample(random.Random(7))
    a = dom.sample_train(random.Random(7), 50)
    assert a == dom.sample_train(random.Random(7), 50)
    assert [p.prompt for p in a] != [p.prompt for p in dom.sample_train(random.Random(8), 50)]


@pytest.mark.parametrize("name", BUILTINS)
def test_answers_correct_alphabet_and_sizes(name):
    dom = get_domain(name)
    rng = random.Random(0)
    for d in dom.difficulties:
        for _ in range(300):
            p = dom.sample(rng, d)
            assert p.domain == name and p.difficulty == d
            assert p.answer == _expected(name, p.prompt)
            assert set(p.prompt) <= set(ALPHABET) and set(p.answer) <= set(ALPHABET)
            assert p.prompt.endswith("=") and len(p.prompt) <= 16 and 1 <= len(p.answer) <= 8
            assert dom.verify(p, p.answer) == 1.0


def test_domain_cues_and_difficulty_semantics():
    rng = random.Random(3)
    for d in (1, 2, 3):
        for _ in range(200):
            add = get_domain("addition").sample(rng, d).prompt
            assert "+" in add and "*" not in add and max(_operand_digits(add, "+")) == d
            mul = get_domain("multiplication").sample(rng, d).prompt
            assert "*" in mul and "+" not in mul
            assert sorted(_operand_digits(mul, "*")) == {1: [1, 1], 2: [1, 2], 3: [2, 2]}[d]
            rev = get_domain("reversal").sample(rng, d).prompt
            srt = get_domain("sorting").sample(rng, d).prompt
            assert rev.startswith("rev:") and srt.startswith("sort:")
            lo, hi = {1: (3, 4), 2: (5, 6), 3: (7, 8)}[d]
            assert lo <= len(rev) - 5 <= hi and lo <= len(srt) - 6 <= hi
            rot = get_domain("caesar").sample(rng, d).prompt
            assert rot.startswith("rot") and lo <= len(rot) - 6 <= hi and len(rot) <= 14
    assert get_domain("caesar").verify.__wrapped__ is partial_match_reward
    ks = {get_domain("caesar").sample(rng, 1).prompt[3] for _ in range(300)}
    assert ks == set("12345")  # every distance is drawn


def test_sample_difficulty_none_is_uniform_and_bad_difficulty_raises():
    dom = get_domain("reversal")
    rng = random.Random(1)
    counts = Counter(dom.sample(rng).difficulty for _ in range(3000))
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 850
    with pytest.raises(ValueError, match="difficulty"):
        dom.sample(rng, 4)


def test_reward_hand_examples():
    p = _prob("495")
    assert partial_match_reward(p, "495") == 1.0
    assert partial_match_reward(p, "  495 ") == 1.0
    assert exact_match(p, " 495") and not exact_match(p, "49")
    assert partial_match_reward(p, "") == 0.0
    assert partial_match_reward(p, "   ") == 0.0
    assert partial_match_reward(p, "485") == pytest.approx(0.5 * 2 / 3)
    assert partial_match_reward(p, "49") == pytest.approx(0.5 * 2 / 3)  # too short
    assert partial_match_reward(p, "4950") == pytest.approx(0.5 * 3 / 4)  # too long
    assert partial_match_reward(p, "abc") == 0.0
    assert partial_match_reward(_prob("edcba"), "edcab") == pytest.approx(0.5 * 3 / 5)


def test_reward_always_in_unit_interval():
    rng = random.Random(5)
    chars = ALPHABET
    for _ in range(2000):
        answer = "".join(rng.choice(chars[:10]) for _ in range(rng.randint(1, 8)))
        completion = "".join(rng.choice(chars) for _ in range(rng.randint(0, 12)))
        r = partial_match_reward(_prob(answer), completion)
        assert 0.0 <= r <= 1.0
        assert (r == 1.0) == exact_match(_prob(answer), completion)


@pytest.mark.parametrize("name", BUILTINS)
def test_eval_set_fixed_dedup_sized_and_covering(name):
    dom = get_domain(name)
    es = dom.eval_set(60)
    assert es == dom.eval_set(60) == dom.eval_set(60, seed=1234)
    assert len(es) == 60
    assert len({p.prompt for p in es}) == 60
    assert Counter(p.difficulty for p in es) == {1: 20, 2: 20, 3: 20}
    assert [p.prompt for p in dom.eval_set(60, seed=99)] != [p.prompt for p in es]
    for p in es:
        assert p.answer == _expected(name, p.prompt)


def test_eval_set_moves_quota_off_exhausted_difficulty():
    dom = get_domain("multiplication")  # 1x1-digit has only 81 prompts
    es = dom.eval_set(300)
    counts = Counter(p.difficulty for p in es)
    assert len(es) == 300 and len({p.prompt for p in es}) == 300
    assert counts[1] < 60  # most of the small space stays available for training
    assert counts[2] > 100 and counts[3] > 100
    assert dom.sample_train(random.Random(0), 200, difficulty=1, exclude=dom.held_out_prompts(300))


def test_eval_set_raises_when_space_too_small(clean_registry):
    @register_domain("tiny_space", difficulties=(1,))
    def tiny(rng, difficulty):
        return f"t:{rng.randint(0, 4)}=", "0"

    assert len(get_domain("tiny_space").eval_set(3)) == 3
    with pytest.raises(DomainError, match="distinct"):
        get_domain("tiny_space").eval_set(50)


@pytest.mark.parametrize("name", BUILTINS)
def test_training_never_sees_eval_prompts(name):
    dom = get_domain(name)
    held = dom.held_out_prompts(90)
    assert held == frozenset(p.prompt for p in dom.eval_set(90))
    rng = random.Random(11)
    train = dom.sample_train(rng, 3000, exclude=held)
    assert len(train) == 3000
    assert not any(p.prompt in held for p in train)
    assert Counter(p.difficulty for p in train).keys() == {1, 2, 3}
    # without exclusion the small spaces do hit eval prompts, so the exclusion is doing real work
    if name in ("addition", "multiplication"):
        raw = dom.sample_train(random.Random(11), 3000)
        assert any(p.prompt in held for p in raw)


def test_sample_train_gives_up_when_everything_is_excluded(clean_registry):
    @register_domain("one_prompt", difficulties=(1,))
    def one(rng, difficulty):
        return "o=", "1"

    with pytest.raises(RuntimeError, match="excluded"):
        get_domain("one_prompt").sample_train(random.Random(0), 1, exclude=frozenset({"o="}))


def test_register_custom_domain_in_a_few_lines(clean_registry):
    @register_domain("echo", difficulties=(1, 2), description="echo:abc= -> abc")
    def echo(rng, difficulty):
        word = "".join(rng.choice("abc") for _ in range(difficulty + 1))
        return f"echo:{word}=", word

    assert callable(echo) and echo(random.Random(0), 1)[0].startswith("echo:")
    dom = get_domain("echo")
    assert "echo" in list_domains()
    assert dom.difficulties == (1, 2) and dom.verify.__wrapped__ is partial_match_reward
    p = dom.sample(random.Random(0))
    assert p.domain == "echo" and dom.verify(p, p.answer) == 1.0

    register_domain("echo")(echo)  # same function again: no-op
    assert get_domain("echo") is dom

    def other(rng, difficulty):
        return "x=", "y"

    with pytest.raises(ValueError, match="already registered"):
        register_domain("echo")(other)
    with pytest.raises(ValueError, match="already registered"):
        register_domain("addition")(other)


def test_custom_verifier_and_invalid_generator_output(clean_registry):
    register_domain("strict", verify=lambda p, c: float(exact_match(p, c)))(lambda rng, d: ("s=", "ok"))
    dom = get_domain("strict")
    p = dom.sample(random.Random(0))
    assert dom.verify(p, "ok") == 1.0 and dom.verify(p, "ox") == 0.0

    register_domain("shouty")(lambda rng, d: ("UPPER=", "A"))
    with pytest.raises(DomainError, match="ALPHABET"):
        get_domain("shouty").sample(random.Random(0))


def test_get_domain_unknown_lists_known():
    with pytest.raises(KeyError) as info:
        get_domain("no_such_domain")
    msg = str(info.value)
    assert "no_such_domain" in msg
    for name in BUILTINS:
        assert name in msg


PLUGIN = """
from mopd.envs import register_domain

@register_domain("plugin_double", difficulties=(1, 2), description="double:n= -> 2n")
def double(rng, difficulty):
    n = rng.randint(0, 10**difficulty - 1)
    return f"double:{n}=", str(2 * n)
"""


def test_load_plugin_registers_domain(tmp_path, clean_registry):
    path = tmp_path / "my_domains.py"
    path.write_text(textwrap.dedent(PLUGIN))
    load_plugin(path)
    assert "plugin_double" in list_domains()
    p = get_domain("plugin_double").sample(random.Random(0), 2)
    assert int(p.answer) == 2 * int(p.prompt[len("double:") : -1])
    load_plugin(str(path))  # loading again is safe
    # relative to the recipe file's directory
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("plugins: [my_domains.py]\n")
    load_plugin("my_domains.py", relative_to=recipe)
    assert list_domains().count("plugin_double") == 1


def test_load_plugin_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="plugin not found"):
        load_plugin(tmp_path / "nope.py")
