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
  whose regex matches, in one pass of each of a few RE2 Sets, not a Python
  loop over the patterns. Sets are compiled lazily: a change costs nothing
  until the next C{match}, and many changes in a row compile once.

An RE2 Set compiles all its patterns into one program within a memory
budget (C{Options.max_mem}); the Router raises that budget, and a Set that
still does not compile is split in two, recursively, so a huge number of
subscriptions makes several smaller Sets instead of a crash.

Why levels. Compiling a Set costs time in proportion to its patterns (about
9 us a pattern: 10,000 take 0.09 s, 100,000 take 1.2 s) and holds the GIL,
so it stalls the reactor whatever thread runs it; and an RE2 Set cannot be
changed once compiled. Recompiling everything on each subscribe therefore
stalls the exchange for a second at 100,000 subscriptions. Many small Sets
are no answer either: every Set is one more pass per topic (about 0.4 us
each at best), so twenty Sets route ten times fewer topics per second than
one. The Router keeps instead, LSM-tree fashion:

  - a I{base}: every pattern as of the last compaction, in as few Sets as
    the memory budget allows;
  - a few I{delta levels} of growing size (by default about 23, 540 and
    12,500 patterns above a base of 100,000) holding what was added or
    changed since. An add goes to the smallest level, which is recompiled
    (a fraction of a millisecond); a level that outgrows its size is merged
    into the next one up, so a pattern is recompiled a few times on its way
    up, not on every change;
  - I{tombstones}: a removed or replaced key is overwritten, in the key list
    of the Set that holds it, by a marker whose matches are dropped. Removing
    compiles nothing.

C{match} is one pass of each non-empty Set, minus tombstones. When the
deltas and tombstones reach the compaction threshold, C{max(compact_min,
compact_ratio x base)} (1,024 or an eighth of the base by default),
everything is compiled into a new base: the full stall of the old design,
but once per thousands of changes, so each change costs a fraction of a
millisecond on average (see bench/pubsub_bench.py for the figures).
"""
from __future__ import annotations

import math
import sys
import time
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
    if isinstance(error, UnicodeError):  # its args[0] is just the codec's name ("utf-8")
        return f"not valid Unicode text ({error})"
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


#: Compaction threshold: the base is rebuilt with every pattern once the
#: patterns in delta levels plus the tombstones reach
#: C{max(COMPACT_MIN, COMPACT_RATIO x base size)}. An eighth keeps the extra
#: compiling per change small (a base of 100,000 compiles in ~1.2 s, once
#: per 12,500 changes) while the deltas stay a small share of the patterns.
COMPACT_MIN = 1024
COMPACT_RATIO = 0.125

#: Roughly the size ratio between consecutive delta levels; with the
#: thresholds above, two or three levels. Larger: fewer Sets to pass per
#: topic, but more patterns recompiled on each change.
LEVEL_GROWTH = 32

#: Folding levels while nothing changes (rent or buy): each extra Set costs
#: every topic a pass (~0.5 us), compiling costs ~10 us a pattern. Once the
#: passes saved by folding would have paid for compiling it, at
#: C{FOLD_MATCHES_PER_PATTERN x patterns / passes saved} matches without a
#: change, the deltas are folded into one level (or, below
#: C{FOLD_BASE_MAX} patterns in all, into the base): never more than about
#: twice the cheapest schedule in hindsight, and a quiet Router ends with one
#: delta Set (or none) to pass.
FOLD_MATCHES_PER_PATTERN = 20

#: The largest base (patterns) that matching alone may recompile, folding
#: the deltas into it: ~0.1 s. Larger bases are recompiled by changes only.
FOLD_BASE_MAX = 10_000

#: What a compiled key list holds in place of a removed or replaced key.
_GONE = object()

_Matcher = Callable[[bytes], Optional[List[int]]]


def _caps(threshold: int, growth: int) -> List[int]:
    """Sizes of the delta levels under a compaction threshold: geometric,
    about C{growth} apart, the last one the threshold itself."""
    if threshold <= 1:
        return [1]
    count = max(1, round(math.log(threshold) / math.log(growth)))
    return [max(1, round(threshold ** ((i + 1) / count))) for i in range(count)]


_RAW_MATCH: Optional[bool] = None


def _matcher(rset: re2.Set) -> _Matcher:
    """C{rset}'s Match for UTF-8 bytes, as cheap a call as there is.

    The pybind object under google-re2's Python wrapper takes bytes directly
    and saves ~0.3 us per Set per topic (a third of a small Set's pass). It is
    not public, so it is used only if it answers a probe as the wrapper does;
    otherwise the wrapper's Match, which takes bytes too.
    """
    global _RAW_MATCH
    if _RAW_MATCH is None:
        try:
            probe = re2.Set.SearchSet(options())
            probe.Add("b")
            probe.Compile()
            raw = probe._set.Match  # type: ignore[attr-defined]
            _RAW_MATCH = list(raw(b"abc")) == [0] and not raw(b"xyz")
        except Exception:
            _RAW_MATCH = False
    if _RAW_MATCH:
        return rset._set.Match  # type: ignore[attr-defined]
    return rset.Match


class _Level:
    """Patterns compiled together: the base, or one delta level.

    C{items} are its live patterns (the base's are those of the Router that
    no delta holds: it has no dict). C{sets} is what was compiled last, each
    Set with its key list (index -> key); a key removed since is overwritten
    there by L{_GONE} (C{dead} counts them) and found through C{slots}. The
    level is C{stale} when C{items} has patterns C{sets} lacks.
    """

    __slots__ = ("items", "cap", "sets", "slots", "dead", "stale")

    def __init__(self, cap: int) -> None:
        self.items: Dict[Hashable, str] = {}
        self.cap = cap
        self.sets: List[Tuple[_Matcher, List[Hashable]]] = []
        self.slots: Dict[Hashable, Tuple[List[Hashable], int]] = {}
        self.dead = 0
        self.stale = False

    def bury(self, key: Hashable) -> None:
        """Drop C{key}'s matches from the compiled Sets, without compiling."""
        slot = self.slots.pop(key, None)
        if slot is not None:
            keys, index = slot
            keys[index] = _GONE
            self.dead += 1

    def empty(self) -> None:
        self.items = {}
        self.sets = []
        self.slots = {}
        self.dead = 0
        self.stale = False


class Router:
    """Keys with regexes; L{match} gives the keys whose regex matches a topic.

    The patterns live in a base and a few small delta levels (see the module
    docstring): adding recompiles the smallest level at the next L{match},
    removing compiles nothing, and the base is recompiled only when the
    changes since it was built reach the compaction threshold. Matching a
    topic is one pass of each Set (one base Set unless there are very many
    patterns, plus the non-empty deltas), so its cost hardly depends on the
    number of patterns that do not match.

    C{compact_min}, C{compact_ratio}, C{level_growth} and
    C{fold_matches_per_pattern} tune the levels (tests use small ones);
    C{compact_min=1, compact_ratio=0} recompiles everything on every change,
    as the Router did before it had levels.
    C{compiles}, C{compiled_patterns}, C{compactions} and C{folds} count the
    work done: Sets compiled, the patterns they held, builds of the whole base,
    and folds of the levels while nothing changed.
    """

    log = Logger()

    def __init__(self, *, set_max_mem: int = SET_MAX_MEM, set_max_patterns: int = SET_MAX_PATTERNS,
                 compact_min: int = COMPACT_MIN, compact_ratio: float = COMPACT_RATIO,
                 level_growth: int = LEVEL_GROWTH,
                 fold_matches_per_pattern: int = FOLD_MATCHES_PER_PATTERN) -> None:
        self._regexes: Dict[Hashable, str] = {}
        self._set_max_mem = set_max_mem
        self._set_max_patterns = max(1, set_max_patterns)
        self._compact_min = max(1, compact_min)
        self._compact_ratio = max(0.0, compact_ratio)
        self._level_growth = max(2, level_growth)
        self._fold_matches = max(1, fold_matches_per_pattern)
        self._base = _Level(0)
        self._deltas: List[_Level] = []
        self._threshold = 1
        #: Every compiled Set with its key list, base first; None when a level is stale.
        self._sets: Optional[List[Tuple[_Matcher, List[Hashable]]]] = None
        #: Keys whose regex could not join any Set (never expected after validate).
        self.unusable: Set[Hashable] = set()
        self.compiles = 0
        self.compiled_patterns = 0
        self.compactions = 0
        self.folds = 0
        #: Matches left before the levels are folded (see L{FOLD_MATCHES_PER_PATTERN}).
        self._countdown = sys.maxsize
        self._plan()

    def __len__(self) -> int:
        return len(self._regexes)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._regexes

    def items(self) -> Iterable[Tuple[Hashable, str]]:
        return self._regexes.items()

    def add(self, key: Hashable, regex: str) -> None:
        """Route topics matching C{regex} to C{key} (replacing C{key}'s regex).
        L{InvalidRegex} if the regex is refused."""
        current = self._regexes.get(key)
        if current is not None and current == regex:
            return  # validated when it was added
        validate(regex)
        self._put(key, regex)
        self._settle()

    def remove(self, key: Hashable) -> bool:
        """Stop routing to C{key}; whether it was there."""
        if key not in self._regexes:
            return False
        del self._regexes[key]
        self._drop(key)
        self._settle()
        return True

    def clear(self) -> None:
        self._reset({})

    def replace(self, regexes: Dict[Hashable, str]) -> None:
        """Route by exactly C{regexes} (key -> regex); invalid ones are logged and left out.

        A small difference from the current patterns is applied as adds and
        removes (no full recompile); regexes already routed are not validated
        again (validating costs ~18 us each).
        """
        fresh: Dict[Hashable, str] = {}
        current = self._regexes
        for key, regex in regexes.items():
            if isinstance(regex, str) and current.get(key) == regex:
                fresh[key] = regex
                continue
            try:
                fresh[key] = validate(regex)
            except InvalidRegex as e:
                self.log.warn("routing: leaving out {key}: {error}", key=key, error=e)
        if fresh == current:
            return
        changed = [(key, regex) for key, regex in fresh.items() if current.get(key) != regex]
        gone = [key for key in current if key not in fresh]
        if self._pending() + len(changed) + len(gone) >= self._threshold:
            self._reset(fresh)
            return
        for key in gone:
            del current[key]
            self._drop(key)
        for key, regex in changed:
            self._put(key, regex)
            self._settle()
        self._regexes = fresh  # same patterns as current now; fresh's order
        self._settle()

    @property
    def set_count(self) -> int:
        """How many RE2 Sets the patterns are compiled into (builds them if stale)."""
        return len(self._built())

    def match(self, topic: str) -> Set[Hashable]:
        """Every key whose regex matches (searches) C{topic}."""
        sets = self._sets
        if sets is None:
            sets = self._built()
        else:
            self._countdown -= 1
            if self._countdown <= 0:
                sets = self._fold()
        text = topic.encode("utf-8") if isinstance(topic, str) else topic
        found: Set[Hashable] = set()
        for match, keys in sets:
            indices = match(text)
            if indices:
                found.update(keys[i] for i in indices)
        found.discard(_GONE)
        return found

    # levels --------------------------------------------------------------------

    def _plan(self) -> None:
        """Fresh, empty delta levels sized for the base as it is now."""
        self._threshold = max(self._compact_min, int(len(self._regexes) * self._compact_ratio))
        self._deltas = [_Level(cap) for cap in _caps(self._threshold, self._level_growth)]
        self._sets = None

    def _reset(self, regexes: Optional[Dict[Hashable, str]] = None) -> None:
        """Every pattern (C{regexes}, already validated, if given) goes into a
        new base, compiled at the next match; no delta levels.

        The base keeps no dict of its own: its patterns are whatever of
        C{_regexes} no delta level holds, so this costs nothing until then.
        """
        if regexes is not None:
            self._regexes = regexes
            self.unusable = set()
        self._base = _Level(0)
        self._base.stale = bool(self._regexes)
        self._plan()

    def _put(self, key: Hashable, regex: str) -> None:
        """C{key} routes by C{regex} from now on: in the smallest delta level."""
        if key in self._regexes:
            self._drop(key)
        self._regexes[key] = regex
        first = self._deltas[0]
        first.items[key] = regex
        first.stale = True
        self._sets = None

    def _drop(self, key: Hashable) -> None:
        """Take C{key} out of the level holding it (already out of C{_regexes})."""
        for level in self._deltas:
            if key in level.items:
                del level.items[key]
                break
        else:
            level = self._base
        level.bury(key)
        self.unusable.discard(key)

    def _pending(self) -> int:
        """Patterns in delta levels plus tombstones: what a compaction clears."""
        return self._base.dead + sum(len(d.items) + d.dead for d in self._deltas)

    def _settle(self) -> None:
        """Merge a delta level that outgrew its size into the next; compact at the threshold."""
        deltas = self._deltas
        for i, level in enumerate(deltas[:-1]):
            if len(level.items) <= level.cap:
                break
            upper = deltas[i + 1]
            upper.items.update(level.items)
            upper.stale = True
            level.empty()
            self._sets = None
        if self._pending() >= self._threshold:
            self._reset()

    # building ------------------------------------------------------------------

    def _built(self) -> List[Tuple[_Matcher, List[Hashable]]]:
        """The compiled Sets, compiling what is stale first.

        The largest stale level takes in every smaller level as it is
        compiled (a stale base: every delta, a compaction): compiling those few
        patterns again is cheaper than passing one more Set per topic, and a
        burst of changes without a match compiles once.
        """
        if self._sets is None:
            levels = [self._base] + self._deltas[::-1]  # largest first
            for i, level in enumerate(levels):
                if not level.stale:
                    continue
                below = levels[i + 1:]
                if level is self._base:
                    if any(d.items for d in below):
                        self._reset()
                    level = self._base
                    below = []
                for lower in below:
                    level.items.update(lower.items)
                    lower.empty()
                self._compile(level)
                break
            levels = [self._base] + self._deltas[::-1]
            self._sets = [entry for level in levels for entry in level.sets]
            self._countdown = self._fold_after()
        return self._sets

    def _fold_after(self) -> int:
        """How many matches without a change pay for folding the levels."""
        deltas = [d for d in self._deltas if d.sets]
        patterns = sum(len(d.items) for d in deltas)
        if len(deltas) >= 2:
            return self._fold_matches * patterns // (len(deltas) - 1) + 1
        if deltas and self._base.sets and len(self._regexes) <= FOLD_BASE_MAX:
            return self._fold_matches * len(self._regexes) + 1
        return sys.maxsize

    def _fold(self) -> List[Tuple[_Matcher, List[Hashable]]]:
        """Fold the deltas into the largest (or into the base): fewer Sets to pass."""
        self.folds += 1
        deltas = [d for d in self._deltas if d.items]
        if len(deltas) >= 2:
            top = self._deltas[-1]
            for lower in self._deltas[:-1]:
                top.items.update(lower.items)
                lower.empty()
            top.stale = True
        elif deltas and len(self._regexes) > len(deltas[0].items) and len(self._regexes) <= FOLD_BASE_MAX:
            self._reset()
        else:  # removals emptied levels since: just stop passing their Sets
            for level in self._deltas:
                if not level.items:
                    level.empty()
        self._sets = None
        return self._built()

    def _compile(self, level: _Level) -> None:
        """Compile C{level}'s patterns afresh (into Sets of at most C{set_max_patterns})."""
        started = time.perf_counter()
        if level is self._base:
            self.unusable = set()
            items = list(self._regexes.items())
        elif self.unusable:
            self.unusable.difference_update(level.items)
            items = list(level.items.items())
        else:
            items = list(level.items.items())
        sets: List[Tuple[re2.Set, List[Hashable]]] = []
        step = self._set_max_patterns
        for start in range(0, len(items), step):
            sets.extend(self._build(items[start:start + step]))
        level.sets = [(_matcher(rset), keys) for rset, keys in sets]
        level.slots = {key: (keys, i) for _, keys in level.sets for i, key in enumerate(keys)}
        level.dead = 0
        level.stale = False
        if level is self._base:
            self.compactions += 1
            seconds = time.perf_counter() - started
            if len(sets) > 1 or seconds >= 0.1:
                self.log.info("routing: {patterns} patterns compiled into {sets} RE2 set(s) in {seconds:.2f} s",
                              patterns=len(items) - len(self.unusable), sets=len(sets), seconds=seconds)

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
        self.compiles += 1
        self.compiled_patterns += len(keys)
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
