"""Bounded waits the component tests share."""
from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor, task


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def eventually(predicate: Any, timeout: float = 10.0) -> Any:
    """Poll C{predicate} (which may return a Deferred) until it is true; fail after C{timeout}."""
    waited = 0.0
    while True:
        value = yield defer.maybeDeferred(predicate)
        if value:
            return value
        if waited > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        yield sleep(0.01)
        waited += 0.01
