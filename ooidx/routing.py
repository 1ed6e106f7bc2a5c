"""Routing topics to subscriptions: RE2 regexes, matched in linear time.

Subscriptions of pub_sub and filters of notification are regexes with RE2
semantics (google-re2, https://github.com/google/re2/wiki/Syntax): no
backreferences, no lookaround, and matching is linear in the length of the
topic whatever the pattern, so no subscription can stall the exchange. A
regex is searched anywhere in the topic unless anchored (C{^}, C{$}).

- L{validate}: refuse a regex that is too long, invalid or unsupported
  (L{InvalidRegex}, with RE2's reason).
- L{compile_filter}: one regex as a predicate C{topic -> bool}.
- L{Router}: many regexes under keys; C{match(topic)} answers every key
  whose regex matches, in one pass of an RE2 Set (per chunk, see below), not
  a Python loop over the patterns. The Set is built lazily after a change:
  compile once, match many.

An RE2 Set compiles all its patterns into one program within a memory
budget (C{Options.max_mem}); the Router raises that budget, and a Set that
still does not compile is split in two, recursively, so a huge number of
subscriptions makes several smaller Sets instead of a crash.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, Iterable, List, Optional, Set, Tuple

import re2
from twisted.logger import Logger

from ooidx.errors import InvalidRegex

#: The longest regex accepted, in UTF-8 bytes.
MAX_REGEX_BYTES = 4096

#: Memory budget of one compiled subscription regex (RE2's default).
REGEX_MAX_MEM = 8 << 20

#: Memory budget of one RE2 Set (program plus DFA cache); a Set whose program
#: does not fit is split.
SET_MAX_MEM = 512 << 20

#: Most patterns in one Set before it is split regardless (keeps any one DFA
#: state, and so the DFA cache, small enough to stay effective).
SET_MAX_PATTERNS = 200_000

_HINTS = (
    ("invalid perl operator: (?=", "lookahead is not supported (RE2 syntax)"),
    ("invalid perl operator: (?!", "negative lookahead is not supported (RE2 syntax)"),
    ("invalid perl operator: (?<", "lookbehind is not supported (RE2 syntax)"),
    ("invalid escape sequence: \\1", "backreferences are not supported (RE2 syntax)"),
    ("pattern too large", "the pattern compiles to a program larger than the allowed memory"),
    ("invalid repetition size", "repetition counts above 1000, nested ones multiplied, are not supported"),
)


def options(max_mem: int = REGEX_MAX_MEM) -> re2.Options:
    """RE2 options for subscription regexes: UTF-8, Perl classes, quiet."""
    o = re2.Options()
    o.log_errors = False
    o.max_mem = max_mem
    return o


def _reason(error: Exception) -> str:
    raw = error.args[0] if error.args else str(error)
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    for needle, hint in _HINTS:
        if needle in text:
            return f"{text} ({hint})"
    if text.startswith("invalid escape sequence: \\") and text[-1:].isdigit():
        return f"{text} (backreferences are not supported (RE2 syntax))"
    return text


def validate(regex: object) -> str:
    """C{regex} itself if it is a string of at most L{MAX_REGEX_BYTES} bytes
    that RE2 compiles; else L{InvalidRegex} saying why."""
    if not isinstance(regex, str):
        raise InvalidRegex(f"a regex must be a string, not {type(regex).__name__}")
    size = len(regex.encode("utf-8", "surrogatepass"))
    if size > MAX_REGEX_BYTES:
        raise InvalidRegex(f"regex too long: {size} bytes (at most {MAX_REGEX_BYTES})")
    if "\x00" in regex:
        raise InvalidRegex("a regex may not contain NUL")
    _compile(regex)
    return regex


def _compile(regex: str) -> "re2._Regexp":
    try:
        return re2.compile(regex, options())
    except (re2.error, UnicodeError, TypeError, ValueError) as e:
        raise InvalidRegex(f"invalid or unsupported regex {_short(regex)}: {_reason(e)}") from None


def _short(regex: str, limit: int = 80) -> str:
    return repr(regex if len(regex) <= limit else regex[:limit] + "...")


def compile_filter(regex: str) -> Callable[[str], bool]:
    """A predicate: does C{regex} match (search) the topic? L{InvalidRegex} if
    the regex is refused by L{validate}."""
    validate(regex)
    search = _compile(regex).search

    def matches(topic: str) -> bool:
        return search(topic) is not None

    matches.regex = regex  # type: ignore[attr-defined]
    return matches


class Router:
    """Keys with regexes; L{match} gives the keys whose regex matches a topic.

    Adding or removing marks the Router stale; the next L{match} rebuilds the
    RE2 Set(s) once. Matching a topic is one pass of each Set (one Set unless
    there are very many patterns), so its cost hardly depends on the number
    of patterns that do not match.
    """

    log = Logger()

    def __init__(self, *, set_max_mem: int = SET_MAX_MEM, set_max_patterns: int = SET_MAX_PATTERNS) -> None:
        self._regexes: Dict[Hashable, str] = {}
        self._sets: Optional[List[Tuple[re2.Set, List[Hashable]]]] = None
        self._set_max_mem = set_max_mem
        self._set_max_patterns = max(1, set_max_patterns)
        #: Keys whose regex could not join any Set (never expected after validate).
        self.unusable: Set[Hashable] = set()

    def __len__(self) -> int:
        return len(self._regexes)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._regexes

    def items(self) -> Iterable[Tuple[Hashable, str]]:
        return self._regexes.items()

    def add(self, key: Hashable, regex: str) -> None:
        """Route topics matching C{regex} to C{key} (replacing C{key}'s regex).
        L{InvalidRegex} if the regex is refused."""
        validate(regex)
        if self._regexes.get(key) == regex:
            return
        self._regexes[key] = regex
        self._sets = None

    def remove(self, key: Hashable) -> bool:
        """Stop routing to C{key}; whether it was there."""
        if self._regexes.pop(key, None) is None:
            return False
        self._sets = None
        return True

    def clear(self) -> None:
        self._regexes.clear()
        self._sets = None

    def replace(self, regexes: Dict[Hashable, str]) -> None:
        """Route by exactly C{regexes} (key -> regex); invalid ones are logged and left out."""
        fresh: Dict[Hashable, str] = {}
        for key, regex in regexes.items():
            try:
                fresh[key] = validate(regex)
            except InvalidRegex as e:
                self.log.warn("routing: leaving out {key}: {error}", key=key, error=e)
        if fresh != self._regexes:
            self._regexes = fresh
            self._sets = None

    @property
    def set_count(self) -> int:
        """How many RE2 Sets the patterns are compiled into (builds them if stale)."""
        return len(self._built())

    def match(self, topic: str) -> Set[Hashable]:
        """Every key whose regex matches (searches) C{topic}."""
        found: Set[Hashable] = set()
        for rset, keys in self._built():
            indices = rset.Match(topic)
            if indices:
                found.update(keys[i] for i in indices)
        return found

    # building ------------------------------------------------------------------

    def _built(self) -> List[Tuple[re2.Set, List[Hashable]]]:
        if self._sets is None:
            self.unusable = set()
            items = list(self._regexes.items())
            sets: List[Tuple[re2.Set, List[Hashable]]] = []
            step = self._set_max_patterns
            for start in range(0, len(items), step):
                sets.extend(self._build(items[start:start + step]))
            self._sets = sets
            if len(sets) > 1:
                self.log.info("routing: {patterns} patterns compiled into {sets} RE2 sets",
                              patterns=len(items) - len(self.unusable), sets=len(sets))
        return self._sets

    def _build(self, items: List[Tuple[Hashable, str]]) -> List[Tuple[re2.Set, List[Hashable]]]:
        """One Set of C{items}, or (if it will not compile) the Sets of each half."""
        if not items:
            return []
        rset = re2.Set.SearchSet(options(self._set_max_mem))
        keys: List[Hashable] = []
        for key, regex in items:
            try:
                index = rset.Add(regex)
            except re2.error as e:
                self.unusable.add(key)
                self.log.error("routing: {key} left out, RE2 Set refuses {regex}: {error}",
                               key=key, regex=_short(regex), error=_reason(e))
                continue
            assert index == len(keys)
            keys.append(key)
        if not keys:
            return []
        try:
            rset.Compile()
        except re2.error:
            if len(items) == 1:
                key, regex = items[0]
                self.unusable.add(key)
                self.log.error("routing: {key} left out, its regex {regex} does not compile into a Set",
                               key=key, regex=_short(regex))
                return []
            half = len(items) // 2
            self.log.info("routing: an RE2 Set of {n} patterns exceeds its memory budget; splitting it",
                          n=len(items))
            return self._build(items[:half]) + self._build(items[half:])
        return [(rset, keys)]
