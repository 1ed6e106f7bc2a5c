"""Bounded waits on the real reactor, for the tiers that need a broker,
sockets or subprocesses: every wait ends, with a failure that says what was
awaited. (The fast tier does not wait: it steps a Clock, see magnet.testing.)

All return Deferreds, so they serve C{yield} in inlineCallbacks and C{await}
in coroutines alike.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Tuple, Type

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

#: The default bound of every wait, in seconds.
TIMEOUT = 10.0
#: How often C{eventually} asks again.
INTERVAL = 0.02


def _reactor(clock: Optional[IReactorTime]) -> IReactorTime:
    if clock is not None:
        return clock
    from twisted.internet import reactor
    return reactor


def wait(d: defer.Deferred, seconds: float = TIMEOUT, clock: Optional[IReactorTime] = None) -> defer.Deferred:
    """C{d}, failing with L{defer.TimeoutError} if it has not fired within C{seconds}."""
    return d.addTimeout(seconds, _reactor(clock))


def sleep(seconds: float, clock: Optional[IReactorTime] = None) -> defer.Deferred:
    """A Deferred that fires after C{seconds} (without blocking the reactor)."""
    return task.deferLater(_reactor(clock), seconds, lambda: None)


@defer.inlineCallbacks
def eventually(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition",
               interval: float = INTERVAL, tolerate: Tuple[Type[BaseException], ...] = (),
               clock: Optional[IReactorTime] = None) -> Any:
    """Ask C{predicate} (it may return a Deferred or an awaitable) every
    C{interval} seconds until it returns a true value, and fire with that
    value; fail with AssertionError naming C{what} and the last answer after
    C{timeout} seconds. Exceptions of the C{tolerate} types count as "not yet"."""
    reactor = _reactor(clock)
    deadline = reactor.seconds() + timeout
    last: Any = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value) and not isinstance(value, defer.Deferred):
                value = defer.ensureDeferred(value)
            value = yield value
        except tolerate as e:
            value = None
            last = e
        else:
            last = value
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        yield sleep(interval, reactor)


def until(predicate: Callable[[], Any], seconds: float = TIMEOUT, what: str = "condition") -> defer.Deferred:
    """L{eventually} under the name the magnet tests use."""
    return eventually(predicate, seconds, what)
