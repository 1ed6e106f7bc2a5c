"""ooidx.routing: RE2 regexes for subscriptions, one at a time and as a Router."""
from __future__ import annotations

import random
import re
import time

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


# levels: base, deltas, tombstones, compaction ---------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ooidx import routing  # noqa: E402

from tests.fast.core.support import FastCase, cases, expand


def naive_match(regexes: dict, topic: str) -> set:
    return {key for key, regex in regexes.items() if re.search(regex, topic)}


def dataset_patterns(n: int) -> dict:
    return {i: rf"^dataset\.sst_{i}$" for i in range(n)}


@st.composite
def patterns_(draw: st.DrawFn) -> str:
    parts = ["^"] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        parts.append(draw(st.sampled_from(ATOMS)) + draw(st.sampled_from(["", "*", "+", "?", "{1,2}"])))
    if draw(st.booleans()):
        parts.append("$")
    return "".join(parts)


keys_ = st.one_of(st.integers(0, 12), st.sampled_from(["a", "b", "c"]))
topics_ = st.text(alphabet="abcx._19", max_size=10)
operations = st.lists(st.one_of(
    st.tuples(st.just("add"), keys_, patterns_()),
    st.tuples(st.just("remove"), keys_),
    st.tuples(st.just("match"), topics_),
    st.tuples(st.just("replace"), st.lists(keys_, max_size=3), st.dictionaries(keys_, patterns_(), max_size=3)),
    st.tuples(st.just("clear")),
), max_size=60)


@expand
class RoutingTests(FastCase):
    def test_compile_filter_agrees_with_re_on_a_random_corpus(self) -> None:
        rng = random.Random(5)
        topics = [random_topic(rng) for _ in range(300)]
        for _ in range(200):
            pattern = random_pattern(rng)
            matches = compile_filter(pattern)
            expected = re.compile(pattern)
            for topic in topics:
                assert matches(topic) == (expected.search(topic) is not None), (pattern, topic)

    def test_router_agrees_with_re_on_a_random_corpus(self) -> None:
        rng = random.Random(7)
        patterns = {f"k{i}": random_pattern(rng) for i in range(500)}
        router = Router()
        for key, pattern in patterns.items():
            router.add(key, pattern)
        compiled = {key: re.compile(p) for key, p in patterns.items()}
        for _ in range(500):
            topic = random_topic(rng)
            assert router.match(topic) == {k for k, c in compiled.items() if c.search(topic)}, topic

    def test_search_anywhere_unless_anchored(self) -> None:
        assert compile_filter(r"saved")("event.saved.sst")
        assert not compile_filter(r"^saved")("event.saved.sst")
        assert compile_filter(r"^event\.saved\.")("event.saved.sst")
        assert not compile_filter(r"sst$")("event.saved.sst2")
        assert compile_filter("")("anything")

    def test_router_add_replace_remove_and_lazy_rebuild(self) -> None:
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

    def test_router_builds_once_for_many_matches(self) -> None:
        monkeypatch = self.monkeypatch()
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

    @cases("regex, words", [
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
    def test_invalid_or_unsupported_syntax_is_refused_clearly(self, regex, words) -> None:
        with self.assertRaises(InvalidRegex) as e:
            validate(regex)
        assert words in str(e.exception)
        with self.assertRaises(InvalidRegex):
            compile_filter(regex)
        with self.assertRaises(InvalidRegex):
            Router().add("k", regex)

    @cases("value", [None, 1, b"abc", ["a"]])
    def test_non_strings_are_refused(self, value) -> None:
        with self.assertRaises(InvalidRegex):
            validate(value)
        with self.assertRaises(InvalidRegex):
            Router().add("k", value)  # type: ignore[arg-type]

    def test_size_limit(self) -> None:
        assert validate("a" * MAX_REGEX_BYTES)
        with self.assertRaisesRegex(InvalidRegex, "too long"):
            validate("a" * (MAX_REGEX_BYTES + 1))
        with self.assertRaisesRegex(InvalidRegex, "too long"):
            validate("é" * (MAX_REGEX_BYTES // 2 + 1))  # counted in UTF-8 bytes

    def test_a_program_too_large_for_the_memory_budget_is_refused(self) -> None:
        with self.assertRaises(InvalidRegex):
            validate(r"(\pL{1000}){20}" )

    @cases("regex, text", [
        (r"(a+)+$", "a" * 100_000 + "!"),
        (r"(a|a)*b", "a" * 100_000),
        (r"(a*)*c", "a" * 100_000),
        (r"(x+x+)+y", "x" * 100_000),
        (r"^(\w+\s?)*$", "word " * 20_000 + "!"),
    ])
    def test_pathological_regexes_run_in_linear_time(self, regex, text) -> None:
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

    def test_a_set_that_does_not_fit_is_split_not_a_crash(self) -> None:
        router = Router(set_max_mem=20_000)
        for i in range(300):
            router.add(i, rf"^dataset\.sst_{i}$")
        assert router.set_count > 1
        assert router.unusable == set()
        for i in range(300):
            assert router.match(f"dataset.sst_{i}") == {i}
        assert router.match("dataset.sst_300") == set()

    def test_100000_patterns_compile_and_match(self) -> None:
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

    def test_replace_leaves_out_invalid_regexes(self) -> None:
        router = Router()
        router.replace({"a": "x", "b": "(?=y)"})
        assert "a" in router and "b" not in router
        assert router.match("xy") == {"a"}

    def test_an_add_at_scale_compiles_only_the_small_delta_not_the_base(self) -> None:
        router = Router()
        router.replace(dataset_patterns(3000))
        assert router.match("dataset.sst_7") == {7}
        assert (router.compactions, router.compiles, router.compiled_patterns) == (1, 1, 3000)
        router.add("new", r"^dataset\.sst_7$")
        assert router.match("dataset.sst_7") == {7, "new"}
        assert router.compactions == 1  # the base was not compiled again
        assert router.compiles == 2 and router.compiled_patterns == 3001
        router.add("newer", r"sst_8$")
        assert router.match("dataset.sst_8") == {8, "newer"}
        assert router.compactions == 1 and router.compiled_patterns == 3001 + 2  # the smallest level: 2 patterns
        assert router.set_count == 2

    def test_after_a_compaction_an_add_does_not_compile_the_base_again(self) -> None:
        router = Router(compact_min=16, compact_ratio=0.125)
        router.replace(dataset_patterns(200))
        router.match("x")
        i = 200
        while router.compactions == 1:  # up to the threshold: a compaction
            router.add(i, rf"^dataset\.sst_{i}$")
            assert router.match(f"dataset.sst_{i}") == {i}
            i += 1
        assert i == 200 + 25  # an eighth of 200
        compactions, patterns = router.compactions, router.compiled_patterns
        router.add("one", "^one$")
        assert router.match("one") == {"one"}
        assert router.compactions == compactions
        assert router.compiled_patterns == patterns + 1
        assert router.match("dataset.sst_224") == {224}

    def test_a_removal_compiles_nothing_and_its_matches_are_dropped(self) -> None:
        router = Router()
        router.replace(dataset_patterns(100))
        router.add("delta", r"^dataset\.")
        assert router.match("dataset.sst_5") == {5, "delta"}
        compiles = router.compiles
        assert router.remove(5) and router.remove("delta")
        assert router.match("dataset.sst_5") == set()
        assert router.match("dataset.sst_6") == {6}
        assert router.compiles == compiles
        assert 5 not in router and "delta" not in router and len(router) == 99
        router.add(5, r"^dataset\.sst_5$")  # back again, in a delta this time
        assert router.match("dataset.sst_5") == {5}

    def test_replacing_a_keys_regex_routes_by_the_new_regex_only(self) -> None:
        router = Router()
        router.replace(dataset_patterns(100))
        assert router.match("dataset.sst_3") == {3}
        router.add(3, r"^event\.three$")  # in the base: tombstone there, new regex in a delta
        assert router.match("dataset.sst_3") == set()
        assert router.match("event.three") == {3}
        router.add(3, r"^event\.trois$")  # in a delta: replaced again
        assert router.match("event.three") == set()
        assert router.match("event.trois") == {3}
        assert dict(router.items())[3] == r"^event\.trois$"
        router.add(3, r"^dataset\.sst_3$")  # back to what the base still holds (buried)
        assert router.match("dataset.sst_3") == {3}
        assert router.match("event.trois") == set()

    def test_compaction_happens_at_the_threshold_not_before(self) -> None:
        router = Router(compact_min=8, compact_ratio=0.0, level_growth=2)
        router.replace(dataset_patterns(50))
        router.match("x")
        assert router.compactions == 1
        for i in range(7):  # 7 pending changes: below the threshold of 8
            router.add(f"k{i}", f"^k{i}$")
            router.match("x")
        assert router.compactions == 1
        assert router.set_count > 1
        router.remove(0)  # the 8th change
        assert router.match("dataset.sst_0") == set()
        assert router.compactions == 2
        assert router.set_count == 1
        assert router.match("k3") == {"k3"}

    def test_old_behaviour_recompiles_everything_on_every_change(self) -> None:
        router = Router(compact_min=1, compact_ratio=0)
        router.replace(dataset_patterns(20))
        router.match("x")
        for i in range(5):
            router.add(f"k{i}", f"^k{i}$")
            router.match("x")
        router.remove("k0")
        router.match("x")
        assert router.compactions == 7
        assert router.set_count == 1

    def test_a_quiet_router_folds_its_levels(self) -> None:
        router = Router(compact_min=1000, level_growth=4)
        router.replace(dataset_patterns(20_000))
        for i in range(40):
            router.add(f"k{i}", f"^k{i}$")
            router.match("x")
        assert router.set_count >= 3  # base plus several delta levels
        compactions = router.compactions
        for _ in range(2000):
            assert router.match("k7") == {"k7"}
        assert router.folds >= 1
        assert router.set_count == 2  # base plus one delta
        assert router.compactions == compactions  # a base this large is compiled by changes only
        assert router.match("dataset.sst_19999") == {19999}

    def test_a_small_quiet_router_folds_into_its_base(self) -> None:
        router = Router()
        router.replace(dataset_patterns(100))
        router.match("x")
        router.add("k", "^k$")
        router.match("x")
        assert router.set_count == 2
        for _ in range(20 * 101 + 2):
            router.match("k")
        assert router.set_count == 1
        assert router.match("k") == {"k"}

    def test_a_removal_that_empties_the_deltas_does_not_recompile_a_large_base(self) -> None:
        router = Router(level_growth=2, fold_matches_per_pattern=1)
        router.replace(dataset_patterns(12_000))
        router.match("x")
        router.add("a", "^a$")
        router.match("x")
        router.add("b", "^b$")
        router.add("c", "^c$")
        router.match("x")
        router.remove("a")
        router.remove("b")
        router.remove("c")
        for _ in range(50):
            assert router.match("a") == set()
        assert router.compactions == 1

    def test_many_adds_without_a_match_compile_once(self) -> None:
        router = Router(compact_min=64, level_growth=4)
        router.replace(dataset_patterns(5000))
        router.match("x")
        compiles = router.compiles
        for i in range(50):
            router.add(f"k{i}", f"^k{i}$")
        assert router.match("k49") == {"k49"}
        assert router.compiles == compiles + 1
        assert router.set_count == 2

    def test_replace_with_a_small_difference_does_not_recompile_the_base(self) -> None:
        router = Router()
        regexes = dataset_patterns(2000)
        router.replace(regexes)
        router.match("x")
        changed = dict(regexes)
        del changed[1]
        changed[2] = "^two$"
        changed["new"] = "^new$"
        router.replace(changed)
        assert router.match("dataset.sst_1") == set()
        assert router.match("dataset.sst_2") == set()
        assert router.match("two") == {2}
        assert router.match("new") == {"new"}
        assert router.compactions == 1
        assert dict(router.items()) == changed
        router.replace({"only": "^only$"})  # a large difference: a new base
        assert router.match("only") == {"only"} and router.match("two") == set()
        assert router.compactions == 2 and len(router) == 1

    def test_the_binding_wrappers_match_works_too(self) -> None:
        monkeypatch = self.monkeypatch()
        monkeypatch.setattr(routing, "_RAW_MATCH", False)
        router = Router()
        router.replace(dataset_patterns(10))
        router.add("d", "sst")
        assert router.match("dataset.sst_1") == {1, "d"}
        assert router.match("nothing") == set()

    def test_split_sets_with_levels_still_route_everything(self) -> None:
        router = Router(set_max_mem=20_000, compact_min=32, level_growth=4)
        for i in range(300):
            router.add(i, rf"^dataset\.sst_{i}$")
            if i % 7 == 0:
                router.match("x")
        for i in range(0, 300, 3):
            router.remove(i)
        assert router.set_count > 1
        assert router.unusable == set()
        for i in range(300):
            assert router.match(f"dataset.sst_{i}") == (set() if i % 3 == 0 else {i})

    def test_a_long_random_walk_agrees_with_re(self) -> None:
        rng = random.Random(11)
        router = Router(compact_min=40, compact_ratio=0.25, level_growth=3, fold_matches_per_pattern=2)
        model: dict = {}
        sample = [random_topic(rng) for _ in range(40)]
        for step in range(6000):
            roll = rng.random() if (step // 300) % 2 else rng.random() / 10 + 0.9  # busy, then quiet
            key = rng.randrange(150)
            if roll < 0.45:
                pattern = random_pattern(rng)
                router.add(key, pattern)
                model[key] = pattern
            elif roll < 0.7:
                assert router.remove(key) == (key in model)
                model.pop(key, None)
            else:
                topic = rng.choice(sample)
                assert router.match(topic) == naive_match(model, topic), (step, topic)
        assert router.compactions > 3 and router.folds > 0
        for topic in sample:
            assert router.match(topic) == naive_match(model, topic)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(operations, st.integers(1, 6), st.sampled_from([0.0, 0.25, 0.5]), st.integers(2, 4), st.integers(1, 3))
    def test_router_agrees_with_a_loop_over_re(self, ops: list, compact_min: int, compact_ratio: float, growth: int,
                                               fold: int) -> None:
        router = Router(compact_min=compact_min, compact_ratio=compact_ratio, level_growth=growth,
                        fold_matches_per_pattern=fold)
        model: dict = {}
        for op in ops:
            if op[0] == "add":
                router.add(op[1], op[2])
                model[op[1]] = op[2]
            elif op[0] == "remove":
                assert router.remove(op[1]) == (op[1] in model)
                model.pop(op[1], None)
            elif op[0] == "replace":
                model = {k: v for k, v in model.items() if k not in op[1]}
                model.update(op[2])
                router.replace(dict(model))
            elif op[0] == "clear":
                router.clear()
                model = {}
            else:
                assert router.match(op[1]) == naive_match(model, op[1])
            assert len(router) == len(model)
            assert dict(router.items()) == model
        for topic in ["", "a", "ab", "x.1", "b1", "abc_9", "cc", "a.b.c", "xx__1"]:
            assert router.match(topic) == naive_match(model, topic), topic

    @cases("regex", ["\udc80", "a\ud800b", "[\udfff]"])
    def test_a_lone_surrogate_is_refused_with_a_reason(self, regex) -> None:
        with self.assertRaises(InvalidRegex) as e:
            validate(regex)
        assert "not valid Unicode text" in str(e.exception) and "surrogate" in str(e.exception)
        assert not str(e.exception).endswith(": utf-8")
