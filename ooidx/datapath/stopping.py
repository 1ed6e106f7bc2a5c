"""Waiting for work that is already running, at stop: for at most so long,
and without cancelling it (Deferred.addTimeout on a DeferredList would cancel
every Deferred in it; the work here must be left to end by itself)."""
from __future__ import annotations

from typing import Any, Iterable

from twisted.internet.defer import Deferred, DeferredList, succeed

__all__ = ["ended_within"]


def ended_within(running: Iterable[Deferred], seconds: float, clock: Any) -> Deferred:
    """Fires with True once every one of C{running} has fired, or with False
    after C{seconds}; the Deferreds themselves are left as they are (their
    results and failures are theirs: nothing is consumed here)."""
    running = list(running)
    if not running:
        return succeed(True)
    ended: Deferred = Deferred()
    observed = []
    for d in running:
        mirror: Deferred = Deferred()
        d.addBoth(_pass_to, mirror)
        observed.append(mirror)
    DeferredList(observed, consumeErrors=True).addCallback(lambda _: None if ended.called else ended.callback(True))
    ended.addTimeout(seconds, clock, onTimeoutCancel=lambda result, timeout: False)
    return ended


def _pass_to(result: Any, mirror: Deferred) -> Any:
    if not mirror.called:
        mirror.callback(None)
    return result
