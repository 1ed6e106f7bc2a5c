"""ooidx.routing: RE2 regexes for subscriptions, one at a time and as a Router."""
from __future__ import annotations

import random
import re
import time

import pytest

from ooidx.errors import InvalidRegex
from ooidx.routing import MAX_REGEX_BYTES, Router, compile_filter, validate

# Simple patterns whose meaning is the same in Python's re and in RE2.
ATOMS = ["a", "b", "c", ".", "\\.", "[ab]", "[^c]", "\\d", "x", "_"]


def random_pattern(rng: random.Random) -> str:
    parts = []
    if rng.random() < 0.3:
        parts.append("^")
    for _ in range(rng.randint(1, 4)):
        atom = rng.choice(ATOMS)
        q = rng.choice(["", "", "*", "+", "?", "{1,2}"])
        parts.append(atom + q)
    if rng.random() < 0.2:
        parts.append("(a|b1)")
    if rng.random() < 0.3:
        parts.append("$")
    return "".join(parts)


def random_topic(rng: random.Random) -> str:
    return "".join(rng.choice("abcx._19") for _ in range(rng.randint(0, 12)))


def test_compile_filter_agrees_with_re_on_a_random_corpus() -> None:
    rng = random.Random(5)
    topics = [random_topic(rng) for _ in range(300)]
    for _ in range(200):
        pattern = random_pattern(rng)
        matches = compile_filter(pattern)
        expected = re.compile(pattern)
        for topic in topics:
            assert matches(topic) == (expected.search(topic) is not None), (pattern, topic)


def test_router_agrees_with_re_on_a_random_corpus() -> None:
    rng = random.Random(7)
    patterns = {f"k{i}": random_pattern(rng) for i in range(500)}
    router = Router()
    for key, pattern in patterns.items():
        router.add(key, pattern)
    compiled = {key: re.compile(p) for key, p in patterns.items()}
    for _ in range(500):
        topic = random_topic(rng)
        assert router.match(topic) == {k for k, c in compiled.items() if c.search(topic)}, topic


def test_search_anywhere_unless_anchored() -> None:
    assert compile_filter(r"saved")("event.saved.sst")
    assert not compile_filter(r"^saved")("event.saved.sst")
    assert compile_filter(r"^event\.saved\.")("event.saved.sst")
    assert not compile_filter(r"sst$")("event.saved.sst2")
    assert compile_filter("")("anything")


def test_router_add_replace_remove_and_lazy_rebuild() -> None:
    router = Router()
    assert router.match("dataset.sst") == set()
    router.add("a", r"^dataset\.")
    router.add("b", r"sst")
    assert router.match("dataset.sst") == {"a", "b"}
    assert router.match("event.saved.sst") == {"b"}
    router.add("b", r"^event\.")  # replaces
    assert router.match("dataset.sst") == {"a"}
    assert router.match("event.x") == {"b"}
    assert router.remove("a") is True
    assert router.remove("a") is False
    assert router.match("dataset.sst") == set()
    assert len(router) == 1


def test_router_builds_once_for_many_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    router = Router()
    router.add("a", "x")
    builds = []
    original = router._build
    monkeypatch.setattr(router, "_build", lambda items: builds.append(1) or original(items))
    for _ in range(100):
        router.match("xyz")
    assert len(builds) == 1
    router.add("b", "y")
    router.match("xyz")
    assert len(builds) == 2


@pytest.mark.parametrize("regex, words", [
    (r"(a)\1", "backreferences"),
    (r"foo(?=bar)", "lookahead"),
    (r"foo(?!bar)", "lookahead"),
    (r"(?<=foo)bar", "lookbehind"),
    (r"[abc", "missing ]"),
    (r"a**", "bad repetition"),
    (r"(abc", "missing )"),
    (r"a{1001}", "repetition"),
    (r"((a{100}){100}){100}", "repetition"),
    (r"\Z", "invalid escape"),
])
def test_invalid_or_unsupported_syntax_is_refused_clearly(regex: str, words: str) -> None:
    with pytest.raises(InvalidRegex) as e:
        validate(regex)
    assert words in str(e.value)
    with pytest.raises(InvalidRegex):
        compile_filter(regex)
    with pytest.raises(InvalidRegex):
        Router().add("k", regex)


@pytest.mark.parametrize("value", [None, 1, b"abc", ["a"]])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(InvalidRegex):
        validate(value)


def test_size_limit() -> None:
    assert validate("a" * MAX_REGEX_BYTES)
    with pytest.raises(InvalidRegex, match="too long"):
        validate("a" * (MAX_REGEX_BYTES + 1))
    with pytest.raises(InvalidRegex, match="too long"):
        validate("é" * (MAX_REGEX_BYTES // 2 + 1))  # counted in UTF-8 bytes


def test_a_program_too_large_for_the_memory_budget_is_refused() -> None:
    # Within the syntax's limits, but it compiles to more than RE2's 8 MiB budget.
    with pytest.raises(InvalidRegex):
        validate(r"(\pL{1000}){20}" )


@pytest.mark.parametrize("regex, text", [
    (r"(a+)+$", "a" * 100_000 + "!"),
    (r"(a|a)*b", "a" * 100_000),
    (r"(a*)*c", "a" * 100_000),
    (r"(x+x+)+y", "x" * 100_000),
    (r"^(\w+\s?)*$", "word " * 20_000 + "!"),
])
def test_pathological_regexes_run_in_linear_time(regex: str, text: str) -> None:
    matches = compile_filter(regex)
    started = time.perf_counter()
    assert matches(text) is False
    assert time.perf_counter() - started < 0.1
    router = Router()
    router.add("k", regex)
    router.match("warm")
    started = time.perf_counter()
    assert router.match(text) == set()
    assert time.perf_counter() - started < 0.1


def test_a_set_that_does_not_fit_is_split_not_a_crash() -> None:
    # A tiny Set budget forces splits; every pattern still routes.
    router = Router(set_max_mem=20_000)
    for i in range(300):
        router.add(i, rf"^dataset\.sst_{i}$")
    assert router.set_count > 1
    assert router.unusable == set()
    for i in range(300):
        assert router.match(f"dataset.sst_{i}") == {i}
    assert router.match("dataset.sst_300") == set()


def test_100000_patterns_compile_and_match() -> None:
    router = Router()
    for i in range(100_000):
        kind = i % 4
        if kind == 0:
            router.add(i, rf"^dataset\.sst_{i}$")
        elif kind == 1:
            router.add(i, rf"^event\.saved\.ds{i}\b")
        elif kind == 2:
            router.add(i, rf"^dataset\.ctd_{i}_.*")
        else:
            router.add(i, rf"^event\.(fetched|saved)\.glider{i}$")
    router.add("all-saved", r"event\.saved\..*")
    assert router.set_count >= 1
    assert router.match("dataset.sst_4") == {4}
    assert router.match("dataset.sst_99996") == {99996}
    assert router.match("event.saved.ds5") == {5, "all-saved"}
    assert router.match("event.saved.glider7") == {7, "all-saved"}
    assert router.match("dataset.ctd_6_x") == {6}
    assert router.match("dataset.nothing") == set()
    started = time.perf_counter()
    for i in range(1000):
        router.match(f"dataset.sst_{i * 4}")
    assert time.perf_counter() - started < 1.0


def test_replace_leaves_out_invalid_regexes() -> None:
    router = Router()
    router.replace({"a": "x", "b": "(?=y)"})
    assert "a" in router and "b" not in router
    assert router.match("xy") == {"a"}
