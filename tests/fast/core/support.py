"""What the fast tier's trial classes share in place of pytest's fixtures.

The fast tier runs under both ``python -m twisted.trial tests.fast`` and
``pytest tests/fast``; nothing here needs pytest.

- L{cases} and L{expand}: a parametrized test is one generated method per
  case (``test_x_0``, ``test_x_1``...), so both runners count and name each
  case apart, as C{pytest.mark.parametrize} did.
- L{FastCase}: a C{SynchronousTestCase} with C{tmp_path()} (a fresh
  directory, removed at cleanup) and C{monkeypatch()} (an undo-at-cleanup
  patcher for attributes, environment variables and the working directory).
- L{LogEvents}: the events logged through twisted.logger while a test runs
  (in place of caplog).
- Time is a L{task.Clock}, never the reactor: L{settle} runs what is due
  now, L{drive} moves the clock until a Deferred has its result.
  L{threadless} gives a Clock that is also the reactor's thread API, with
  every ThreadPool made meanwhile a L{SyncPool} (work runs at once, in the
  test's thread): memory:// buses, the cache's and persister's disk work and
  the attribute store's SQLite (adbapi) then all run inside the test.
- L{bus_up} and L{bus_down}: a memory:// bus's start (the topology
  declared) and its stop, with the services on it.
- L{ClockCase} and L{on_clock}: an C{async def} test method run on such a
  clock, with C{await self.advance(s)} and C{await self.advance_until(p)} in
  place of real waits.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Sequence

from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

_CASES = "_fast_cases"


def cases(names: str, values: Iterable[Any], ids: Optional[Sequence[Any]] = None) -> Callable:
    """Mark a test method to run once per value, as C{pytest.mark.parametrize}
    did: C{names} is a comma-separated list of the method's extra arguments.
    Stack several to run the cross product. L{expand} makes the methods."""
    argnames = [name.strip() for name in names.split(",") if name.strip()]
    rows = []
    for value in values:
        rows.append(dict(zip(argnames, value if len(argnames) > 1 else (value,))))
    labels = [str(i) for i in (ids if ids is not None else range(len(rows)))]

    def mark(function: Callable) -> Callable:
        setattr(function, _CASES, [list(zip(labels, rows))] + list(getattr(function, _CASES, [])))
        return function

    return mark


def _label(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def expand(cls: type) -> type:
    """Replace each method marked by L{cases} with one method per case."""
    for name, function in list(vars(cls).items()):
        axes = getattr(function, _CASES, None)
        if axes is None:
            continue
        delattr(cls, name)
        for combination in itertools.product(*axes):
            label = "_".join(_label(part[0]) for part in combination)
            kwargs: dict = {}
            for part in combination:
                kwargs.update(part[1])

            def method(self: Any, _function: Callable = function, _kwargs: dict = kwargs) -> Any:
                return _function(self, **_kwargs)

            method.__name__ = method.__qualname__ = "%s_%s" % (name, label)
            method.__doc__ = ("%s with %r" % (name, kwargs))[:200]
            setattr(cls, method.__name__, method)
    return cls


class MonkeyPatch:
    """Attribute, environment and directory changes undone at the test's
    cleanup, in reverse order (the parts of pytest's C{monkeypatch} the moved
    tests use)."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self._case = case

    def setattr(self, target: Any, name: str, value: Any) -> None:
        self._case.patch(target, name, value)

    def setenv(self, name: str, value: str) -> None:
        self._restore_env(name)
        os.environ[name] = value

    def delenv(self, name: str, raising: bool = True) -> None:
        if name not in os.environ and raising:
            raise KeyError(name)
        self._restore_env(name)
        os.environ.pop(name, None)

    def chdir(self, path: Any) -> None:
        here = os.getcwd()
        self._case.addCleanup(os.chdir, here)
        os.chdir(str(path))

    def _restore_env(self, name: str) -> None:
        old = os.environ.get(name)

        def restore() -> None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

        self._case.addCleanup(restore)


class FastCase(SynchronousTestCase):
    """A synchronous trial test with a temporary directory and a patcher."""

    def tmp_path(self) -> Path:
        """A new empty directory of this test's own, removed at cleanup.
        (Not C{self.mktemp()}: under pytest that path is relative to the
        directory pytest runs in, and would litter the checkout.)"""
        path = Path(tempfile.mkdtemp(prefix="ooidx-fast-"))
        self.addCleanup(shutil.rmtree, str(path), True)
        return path

    def monkeypatch(self) -> MonkeyPatch:
        return MonkeyPatch(self)


class LogEvents:
    """The events logged (globally, through twisted.logger) from its start
    until the test's cleanup; C{texts()} formats them."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: List[dict] = []

        @provider(ILogObserver)
        def observe(event: dict) -> None:
            self.events.append(event)

        globalLogPublisher.addObserver(observe)
        case.addCleanup(globalLogPublisher.removeObserver, observe)

    def texts(self) -> List[str]:
        return [formatEvent(event) or "" for event in self.events]


def settle(clock: Any, limit: int = 100_000) -> None:
    """Run every call on the L{task.Clock} that is due now, and those they
    schedule for now, until none is left (memory:// delivers on later
    "reactor turns": on a Clock, those are calls due at the same time)."""
    for _ in range(limit):
        now = clock.seconds()
        if not any(call.getTime() <= now for call in clock.getDelayedCalls()):
            return
        clock.advance(0)
    raise AssertionError("the clock never settled: calls keep scheduling calls")


def drive(case: SynchronousTestCase, clock: Any, d: Any, step: float = 0.01, seconds: float = 60.0) -> Any:
    """The result of Deferred C{d}, moving C{clock} on (in C{step}s, at most
    C{seconds} of clock time) until it has one; a failure is raised."""
    from twisted.internet import defer

    d = defer.ensureDeferred(d) if not isinstance(d, defer.Deferred) else d
    results: List[Any] = []
    d.addBoth(results.append)
    settle(clock)
    waited = 0.0
    while not results and waited < seconds:
        clock.advance(step)
        settle(clock)
        waited += step
    if not results:
        case.fail("no result after %s s of clock time" % seconds)
    result = results[0]
    from twisted.python.failure import Failure

    if isinstance(result, Failure):
        result.raiseException()
    return result


def bus_up(bus: Any) -> Any:
    """A memory:// bus's start as every component test makes it: started,
    linked, and the exchange's topology declared (ooidx.node.bootstrap). A Deferred."""
    from ooidx.node.bootstrap import declare_topology

    bus.startService()
    return bus.when_connected().addCallback(lambda _: declare_topology(bus))


def bus_down(bus: Any, *services: Any) -> Any:
    """Stop C{services} that started (in that order), then C{bus}. A Deferred."""
    from twisted.internet import defer

    @defer.inlineCallbacks
    def go() -> Any:
        for service in services:
            if service.running or getattr(service, "started", False):
                yield service.stopService()
        yield bus.stopService()
    return go()


class SyncPool:
    """A stand-in for twisted.python.threadpool.ThreadPool whose "threads"
    run each call at once, in the calling thread: blocking disk or SQLite work
    then finishes inside the test, with no thread to wait for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.started = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def adjustPoolsize(self, minthreads: Any = None, maxthreads: Any = None) -> None:
        pass

    def callInThread(self, f: Callable, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def callInThreadWithCallback(self, onResult: Callable, f: Callable, *args: Any, **kwargs: Any) -> None:
        from twisted.python.failure import Failure

        try:
            result = f(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


def _threadless_clock_class() -> type:
    from twisted.internet import task
    from twisted.internet.interfaces import IReactorThreads
    from zope.interface import implementer

    @implementer(IReactorThreads)
    class ThreadlessClock(task.Clock):
        """A task.Clock that is also the reactor's thread API, where a thread's
        work runs at once and its callFromThread lands on the clock (due now):
        components that pick their reactor by IReactorThreads take it."""

        def __init__(self) -> None:
            super().__init__()
            self._pool = SyncPool()
            self._triggers: dict = {}

        def getThreadPool(self) -> SyncPool:
            return self._pool

        def callInThread(self, f: Callable, *args: Any, **kwargs: Any) -> None:
            f(*args, **kwargs)

        def callFromThread(self, f: Callable, *args: Any, **kwargs: Any) -> None:
            self.callLater(0, f, *args, **kwargs)

        def suggestThreadPoolSize(self, size: int) -> None:
            pass

        def callWhenRunning(self, f: Callable, *args: Any, **kwargs: Any) -> None:
            f(*args, **kwargs)

        def addSystemEventTrigger(self, phase: str, event: str, f: Callable, *args: Any, **kwargs: Any) -> Any:
            key = object()
            self._triggers[key] = (phase, event, f, args, kwargs)
            return key

        def removeSystemEventTrigger(self, key: Any) -> None:
            self._triggers.pop(key, None)

    return ThreadlessClock


def threadless(case: SynchronousTestCase) -> Any:
    """A L{task.Clock} that is also IReactorThreads (see SyncPool), with every
    ThreadPool the product makes during the test a L{SyncPool}: memory://
    buses, the cache's and the persister's disk work and the attribute
    store's SQLite then all run on the clock, with no real reactor turn."""
    import twisted.python.threadpool
    from ooidx.datapath import cache
    from ooidx.dissemination import persister

    case.patch(twisted.python.threadpool, "ThreadPool", SyncPool)
    case.patch(cache, "ThreadPool", SyncPool)
    case.patch(persister, "ThreadPool", SyncPool)
    return _threadless_clock_class()()


class ClockCase(FastCase):
    """A synchronous test whose time is C{self.clock} (a threadless
    L{task.Clock}, see L{threadless}), for components on a memory:// bus.
    Write the test as an C{async def} decorated with L{on_clock}, and use
    C{await self.advance(s)} and C{await self.advance_until(predicate)}: they move
    the clock, never wait for real time."""

    @property
    def clock(self) -> Any:
        clock = self.__dict__.get("_clock")
        if clock is None:
            clock = self.__dict__["_clock"] = threadless(self)
        return clock

    def wait(self, d: Any, seconds: float = 60.0) -> Any:
        """The result of C{d} (a Deferred or coroutine), moving the clock on."""
        return drive(self, self.clock, d, seconds=seconds)

    def advance(self, seconds: float) -> Any:
        from twisted.internet import task

        return task.deferLater(self.clock, seconds, lambda: None)

    async def advance_until(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Poll C{predicate} (which may return a Deferred) every 10 ms of clock
        time until it is true; fail after C{timeout} seconds of clock time."""
        from twisted.internet import defer

        waited = 0.0
        while True:
            value = await defer.maybeDeferred(predicate)
            if value:
                return value
            if waited > timeout:
                raise AssertionError(f"condition not met within {timeout} s")
            await self.advance(0.01)
            waited += 0.01


def on_clock(method: Callable) -> Callable:
    """Run an C{async def} test method of a L{ClockCase} to its end on the clock."""
    import functools

    @functools.wraps(method)
    def run(self: ClockCase, *args: Any, **kwargs: Any) -> Any:
        return self.wait(method(self, *args, **kwargs))

    return run
