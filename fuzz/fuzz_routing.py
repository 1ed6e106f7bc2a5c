"""Fuzz ooidx.routing.validate (subscription and filter regexes come from
users) and what a validated regex is then used for.

An input is a regex and a topic, split at the first NUL byte (a regex may
not contain NUL), each decoded as UTF-8 (surrogates allowed, so lone ones
reach validate).

Asserts:
  - validate(regex) returns the regex or raises InvalidRegex, nothing else
  - a regex that validates compiles into a filter (compile_filter) and into a
    Router's RE2 Set (Router.unusable stays empty: validate never accepts a
    regex the Router then leaves out), and the Router matches the topic
    exactly when the filter does
and that each input finishes within libFuzzer's -timeout (RE2: linear time).

RE2 is C++: libFuzzer sees the coverage of ooidx.routing only, not of RE2's
parser. So that it still has something to climb, the harness feeds it
features of its own (an instrumented function with a branch per kind of
RE2 error, per size of the compiled program and per number of groups), and
fuzz/routing.dict (RE2's syntax, and Perl's that RE2 refuses) is used by
default.

    .venv/bin/python fuzz/fuzz_routing.py -max_total_time=60 fuzz/corpus-run/routing fuzz/corpus/routing
"""
from __future__ import annotations


import os

import _harness
import atheris

with atheris.instrument_imports(include=["ooidx.routing"]):
    import re2

    from ooidx.errors import InvalidRegex
    from ooidx.routing import Router, compile_filter, options, validate


def text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace")


ERRORS = ("invalid escape", "invalid character class range", "invalid character class", "missing ]",
          "missing )", "unexpected )", "trailing \\", "no argument for repetition", "invalid repetition size",
          "bad repetition operator", "invalid perl operator", "invalid UTF-8", "invalid named capture",
          "pattern too large", "not valid Unicode", "too long", "NUL")


@atheris.instrument_func
def feedback(reason: str, program: int, groups: int) -> int:
    """A branch for each kind of refusal, each power of two of a program's size
    and each number of groups: coverage the fuzzer can see."""
    if reason:
        for i, kind in enumerate(ERRORS):
            if kind in reason:
                return i
        return -1
    size = 0
    while program > 1 and size < 24:
        program >>= 1
        size += 1
    if groups > 8:
        groups = 8
    if size == 0:
        return 100 + groups
    if size == 1:
        return 200 + groups
    if size == 2:
        return 300 + groups
    if size == 3:
        return 400 + groups
    if size == 4:
        return 500 + groups
    if size == 5:
        return 600 + groups
    if size == 6:
        return 700 + groups
    if size == 7:
        return 800 + groups
    if size == 8:
        return 900 + groups
    if size == 9:
        return 1000 + groups
    if size == 10:
        return 1100 + groups
    if size < 14:
        return 1200 + groups
    return 1300 + groups


def TestOneInput(data: bytes) -> None:
    raw_regex, _, raw_topic = data.partition(b"\x00")
    regex, topic = text(raw_regex), text(raw_topic)
    try:
        validate(regex)
    except InvalidRegex as e:
        assert str(e)
        feedback(str(e), 0, 0)
        return
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        topic = topic.encode("utf-8", "replace").decode("utf-8")
    compiled = re2.compile(regex, options())
    feedback("", compiled.programsize, min(compiled.groups, 8))
    matches = compile_filter(regex)
    router = Router()
    router.add("k", regex)
    found = router.match(topic)
    assert not router.unusable, f"validate accepted {regex!r}, the Router left it out"
    assert ("k" in found) == matches(topic), (regex, topic, found, matches(topic))


if __name__ == "__main__":
    _harness.run(TestOneInput, extra=("-dict=" + os.path.join(_harness.ROOT, "fuzz", "routing.dict"),))
