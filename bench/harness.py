"""The benchmark harness: loads, timing, rows, the table, JSON and plots.

Vocabulary:

  - a I{side} is one implementation of the group's work (magnet, raw
    txAMQP, later pika's Twisted adapter). It is a class whose instances are
    opened on a broker (C{open}), make L{Load}s for the group's benchmarks,
    and are closed (C{close}).
  - a L{Load} is traffic that can be started and paused again; it counts the
    operations it completes (calls answered, deliveries received).
  - a L{Benchmark} is one row of a group: a name, a unit and a function
    C{side -> Deferred[Load]} that sets the load up on a side.
  - a L{Group} is a subject side, its baseline sides and its benchmarks.

For each benchmark, the harness sets the load up on every side, then runs
C{rounds} rounds; in each round every side is measured once, the order
alternating between rounds (A B, B A, A B, ...) so that drift on a noisy
machine hits both sides alike. One measurement: start the load, let it warm
up, count completions over C{seconds}, pause it (stop issuing and let what is
in flight finish). A side's value is the B{best} (highest) rate over its
rounds: on a shared machine, noise only ever slows a run down, so the best
run is the closest to what the code can do. Every measured rate is kept in
L{Result.samples} and printed with C{--verbose}.

Adding a baseline is adding a side: a class with the same load-making methods
as the others, named in the group's C{baselines}. Each benchmark then yields
one row per baseline.
"""
from __future__ import annotations

import json
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


class BenchError(Exception):
    """A benchmark could not run (setup failed, an operation failed, a wait ran out)."""


# ---------------------------------------------------------------------------
# settings and results


@dataclass
class Settings:
    broker: str = DEFAULT_BROKER
    seconds: float = 3.0
    warmup: float = 0.5
    rounds: int = 3
    setup_timeout: float = 30.0
    drain_timeout: float = 15.0
    verbose: bool = False


@dataclass
class Row:
    """One line of the table and one object of the JSON list."""

    name: str
    value: Optional[float]
    unit: str
    baseline: str
    baseline_value: Optional[float]
    ratio: Optional[float]

    def as_json(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class Result:
    """What one benchmark measured on every side."""

    benchmark: "Benchmark"
    samples: Dict[str, List[float]] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)

    def best(self, side: str) -> Optional[float]:
        if side in self.errors or not self.samples.get(side):
            return None
        return max(self.samples[side])


# ---------------------------------------------------------------------------
# loads


class Load:
    """Traffic on one side. Subclasses implement C{_begin} and C{_drained}.

    C{completed} counts finished operations; the harness reads it twice to
    get a rate. An operation that fails is recorded in C{error} and stops the
    load: a benchmark that loses messages or gets errors has no figure.
    """

    def __init__(self, clock: Any, drain_timeout: float = 15.0) -> None:
        self.clock = clock
        self.drain_timeout = drain_timeout
        self.completed = 0
        self.running = False
        self.error: Optional[Failure] = None
        self._cleanups: List[Callable[[], Any]] = []

    def start(self) -> None:
        self.running = True
        self._begin()

    def pause(self) -> Deferred:
        """Stop issuing work; fire once what is in flight has finished."""
        self.running = False
        return bounded(self._drained(), self.drain_timeout, self.clock, "draining the load")

    def failed(self, failure: Failure) -> None:
        if self.error is None:
            self.error = failure
        self.running = False

    def on_close(self, cleanup: Callable[[], Any]) -> None:
        """Run C{cleanup} (may return a Deferred) on L{close}, last added first."""
        self._cleanups.append(cleanup)

    @inlineCallbacks
    def close(self) -> Any:
        self.running = False
        first_error = None
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                yield bounded(defer.maybeDeferred(cleanup), self.drain_timeout, self.clock, "cleaning up")
            except Exception as e:  # keep cleaning up; report the first failure
                first_error = first_error or e
        if first_error is not None:
            raise first_error

    def _begin(self) -> None:
        raise NotImplementedError

    def _drained(self) -> Deferred:
        raise NotImplementedError


class ClosedLoop(Load):
    """Keep C{concurrency} operations in flight; C{operation()} returns a Deferred.

    Sequential calls are C{concurrency=1}.
    """

    def __init__(self, clock: Any, operation: Callable[[], Deferred], concurrency: int,
                 drain_timeout: float = 15.0) -> None:
        super().__init__(clock, drain_timeout)
        self.operation = operation
        self.concurrency = concurrency
        self.inflight = 0
        self._idle: Optional[Deferred] = None

    def _begin(self) -> None:
        for _ in range(self.concurrency - self.inflight):
            self._issue()

    def _issue(self) -> None:
        # A loop, not recursion: an operation may finish synchronously.
        while self.running and self.inflight < self.concurrency:
            self.inflight += 1
            try:
                d = self.operation()
            except Exception:
                self._done(Failure())
                return
            if d.called:
                result = []
                d.addBoth(result.append)
                if isinstance(result[0], Failure):
                    self._done(result[0])
                    return
                self.inflight -= 1
                self.completed += 1
                continue
            d.addBoth(self._done)
            return

    def _done(self, result: Any) -> None:
        self.inflight -= 1
        if isinstance(result, Failure):
            self.failed(result)
        else:
            self.completed += 1
        if self.running:
            self._issue()
        elif self.inflight == 0 and self._idle is not None:
            idle, self._idle = self._idle, None
            idle.callback(None)

    def _drained(self) -> Deferred:
        if self.inflight == 0:
            return defer.succeed(None)
        self._idle = Deferred()
        return self._idle


class Pipeline(Load):
    """Publish with at most C{window} messages outstanding; count deliveries.

    C{publish()} returns the Deferred of the broker's confirm. A message is
    outstanding until its confirm has arrived and all its C{copies} have been
    delivered (C{delivered()} is called by the consumers, once per delivery).
    C{completed} counts deliveries, so a fanout to 10 subscribers counts 10
    per message.
    """

    def __init__(self, clock: Any, publish: Callable[[], Deferred], copies: int, window: int,
                 drain_timeout: float = 15.0) -> None:
        super().__init__(clock, drain_timeout)
        self.publish = publish
        self.copies = copies
        self.window = window
        self.sent = 0
        self.unconfirmed = 0
        self._idle: Optional[Deferred] = None

    def outstanding(self) -> int:
        # messages not yet delivered to every consumer, or not yet confirmed
        return max(self.sent - self.completed // self.copies, self.unconfirmed)

    def _begin(self) -> None:
        self._pump()

    def _pump(self) -> None:
        while self.running and self.outstanding() < self.window:
            self.sent += 1
            self.unconfirmed += 1
            try:
                d = self.publish()
            except Exception:
                self._confirmed(Failure())
                return
            d.addBoth(self._confirmed)

    def _confirmed(self, result: Any) -> None:
        self.unconfirmed -= 1
        if isinstance(result, Failure):
            self.failed(result)
        self._progress()

    def delivered(self, count: int = 1) -> None:
        self.completed += count
        self._progress()

    def _progress(self) -> None:
        if self.running:
            self._pump()
        elif self._idle is not None and self.outstanding() <= 0:
            idle, self._idle = self._idle, None
            idle.callback(None)

    def _drained(self) -> Deferred:
        if self.outstanding() <= 0:
            return defer.succeed(None)
        self._idle = Deferred()
        return self._idle


# ---------------------------------------------------------------------------
# groups


@dataclass
class Benchmark:
    """One row of a group: C{make(side)} sets a load up on a side."""

    name: str
    unit: str
    make: Callable[[Any], Deferred]


@dataclass
class Group:
    name: str
    description: str
    subject: str
    baselines: List[str]
    sides: Dict[str, Callable[[Any, Settings], Any]]  # side name -> class(reactor, settings)
    benchmarks: List[Benchmark]


def bounded(d: Deferred, seconds: float, clock: Any, what: str) -> Deferred:
    """C{d}, failing with L{BenchError} if it has not fired within C{seconds}."""
    def timed_out(result: Any, timeout: float) -> None:
        raise BenchError(f"{what}: no result within {timeout:g} s")

    return d.addTimeout(seconds, clock, onTimeoutCancel=timed_out)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@inlineCallbacks
def measure(reactor: Any, load: Load, settings: Settings) -> Any:
    """One measurement of a load: warm up, count over C{seconds}, pause."""
    load.start()
    yield deferLater(reactor, settings.warmup, lambda: None)
    c0, t0 = load.completed, time.perf_counter()
    yield deferLater(reactor, settings.seconds, lambda: None)
    c1, t1 = load.completed, time.perf_counter()
    try:
        yield load.pause()
    except Exception:
        if load.error is None:
            raise
    if load.error is not None:  # the first failure, not a drain timeout it caused
        load.error.raiseException()
    if c1 == c0:
        raise BenchError("no operation completed during the measurement")
    return (c1 - c0) / (t1 - t0)


@inlineCallbacks
def run_group(reactor: Any, group: Group, settings: Settings) -> Any:
    """Measure every benchmark of a group on all its sides; fires with the L{Row}s."""
    side_names = [group.subject] + list(group.baselines)
    results: List[Result] = []
    for benchmark in group.benchmarks:
        result = Result(benchmark)
        results.append(result)
        log(f"[{group.name}] {benchmark.name}")
        sides: Dict[str, Any] = {}
        loads: Dict[str, Load] = {}
        try:
            for name in side_names:
                try:
                    side = group.sides[name](reactor, settings)
                    yield bounded(defer.maybeDeferred(side.open), settings.setup_timeout, reactor,
                                  f"{name}: connecting")
                    sides[name] = side
                    loads[name] = yield bounded(defer.maybeDeferred(benchmark.make, side),
                                                settings.setup_timeout, reactor, f"{name}: setting up")
                except Exception as e:
                    result.errors[name] = _describe(e)
                    log(f"  {name}: setup failed: {result.errors[name]}")
                    if settings.verbose:
                        traceback.print_exc()
            order = [n for n in reversed(side_names) if n in loads]  # baselines first
            for round_no in range(settings.rounds):
                this_round = order if round_no % 2 == 0 else list(reversed(order))
                for name in this_round:
                    if name in result.errors:
                        continue
                    try:
                        rate = yield measure(reactor, loads[name], settings)
                    except Exception as e:
                        result.errors[name] = _describe(e)
                        log(f"  {name}: failed: {result.errors[name]}")
                        if settings.verbose:
                            traceback.print_exc()
                        continue
                    result.samples.setdefault(name, []).append(rate)
                    if settings.verbose:
                        log(f"  round {round_no + 1} {name}: {rate:,.0f} {benchmark.unit}")
        finally:
            for name, load in loads.items():
                try:
                    yield load.close()
                except Exception as e:
                    log(f"  {name}: cleanup failed: {_describe(e)}")
            for name, side in sides.items():
                try:
                    yield bounded(defer.maybeDeferred(side.close), settings.drain_timeout, reactor,
                                  f"{name}: closing")
                except Exception as e:
                    log(f"  {name}: closing failed: {_describe(e)}")
        summary = ", ".join(f"{n} {_fmt(result.best(n))}" for n in side_names)
        log(f"  best: {summary} {benchmark.unit}")
    return rows_of(group, results), results


def rows_of(group: Group, results: Iterable[Result]) -> List[Row]:
    rows = []
    for result in results:
        value = result.best(group.subject)
        for baseline in group.baselines:
            base = result.best(baseline)
            ratio = value / base if value is not None and base else None
            rows.append(Row(result.benchmark.name, _round(value), result.benchmark.unit, baseline,
                            _round(base), None if ratio is None else round(ratio, 3)))
    return rows


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)


def _fmt(value: Optional[float]) -> str:
    return "failed" if value is None else f"{value:,.0f}"


def _describe(e: BaseException) -> str:
    text = str(e) or repr(e)
    return f"{type(e).__name__}: {text}"


# ---------------------------------------------------------------------------
# output


def table(rows: Sequence[Row], subject: str = "magnet") -> str:
    headers = ["name", f"value ({subject})", "unit", "baseline", "baseline_value", "ratio"]
    body = [[r.name, _fmt(r.value), r.unit, r.baseline, _fmt(r.baseline_value),
             "-" if r.ratio is None else f"{r.ratio:.2f}"] for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *body)]
    right = {1, 4, 5}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(cells) for cells in body)
    return "\n".join(out)


def write_json(rows: Sequence[Row], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([r.as_json() for r in rows], f, indent=2)
        f.write("\n")


def plot(group: Group, rows: Sequence[Row], directory: str) -> Optional[str]:
    """A PNG bar chart of the group's ratios to each baseline; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("--plot: matplotlib is not installed (pip install 'ooidx[bench]' or matplotlib); no plot written")
        return None
    import os

    os.makedirs(directory, exist_ok=True)
    names = list(dict.fromkeys(r.name for r in rows))
    baselines = list(dict.fromkeys(r.baseline for r in rows))
    width = 0.8 / max(1, len(baselines))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(names)), 4.5))
    for i, baseline in enumerate(baselines):
        ratios = []
        for name in names:
            match = [r for r in rows if r.name == name and r.baseline == baseline]
            ratio = match[0].ratio if match and match[0].ratio is not None else math.nan
            ratios.append(ratio)
        xs = [j + (i - (len(baselines) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, ratios, width, label=f"{group.subject} / {baseline}")
        for bar, ratio in zip(bars, ratios):
            if not math.isnan(ratio):
                ax.annotate(f"{ratio:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)))
    import textwrap

    ax.set_xticklabels([textwrap.fill(n, 20) for n in names], fontsize=8)  # long row names on a few lines
    ax.set_ylabel("ratio (same run)")
    ax.set_title(f"{group.name}: {group.subject} as a ratio of each baseline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(directory, f"{group.name}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
