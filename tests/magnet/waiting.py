"""Bounded waits the magnet tests share: every wait ends, with a clear failure."""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, reactor, task

TIMEOUT = 10.0


def wait(d: defer.Deferred, seconds: float = TIMEOUT) -> defer.Deferred:
    return d.addTimeout(seconds, reactor)


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def until(predicate: Callable[[], bool], seconds: float = TIMEOUT, what: str = "condition") -> Any:
    deadline = reactor.seconds() + seconds
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        yield sleep(0.02)
