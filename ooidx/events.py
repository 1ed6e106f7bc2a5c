"""Events: small JSON messages with a topic, sent to the notification fanout.

Components tell the world what happened (a dataset registered, fetched,
cached, purged, saved, or a failure) with L{emit}; anyone who wants "all
events matching this regex" calls L{subscribe}. See docs/dissemination.md.

Emitting never fails the caller: an event is a report, not part of the work,
so one that cannot be sent is logged and dropped.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from magnet import Bus, Message
from ooidx import wire

NOTIFICATION = wire.NOTIFICATION
EVENT = wire.EVENT
TOPIC_HEADER = wire.TOPIC_HEADER
KINDS = frozenset(("registered", "fetched", "cached", "purged", "saved", "failed", "refreshed", "stale"))

log = Logger(namespace="ooidx.events")


def topic_of(kind: str, dataset: Optional[str]) -> str:
    return f"event.{kind}.{dataset or '-'}"


def event_message(kind: str, dataset: Optional[str], *, node: str, now: float, **details: Any) -> Message:
    topic = topic_of(kind, dataset)
    body = dict(details, topic=topic, kind=kind, dataset=dataset, time=now, node=node)
    return Message.of_json(body, type=EVENT, headers={TOPIC_HEADER: topic}, persistent=False)


def emit(bus: Bus, kind: str, dataset: Optional[str] = None, **details: Any) -> Deferred:
    """Send an event; fires with None whether or not it could be sent."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    try:
        message = event_message(kind, dataset, node=bus.node, now=time.time(), **details)
    except (TypeError, ValueError) as e:
        log.error("event {kind} for {dataset} not sent: {error}", kind=kind, dataset=dataset, error=e)
        return succeed(None)
    d = bus.send(NOTIFICATION, message, mandatory=False)
    d.addErrback(lambda f: log.warn("event {topic} not sent: {error}", topic=message.headers[TOPIC_HEADER],
                                    error=f.getErrorMessage()))
    return d.addCallback(lambda _: None)


def subscribe(bus: Bus, regex: str, handler: Callable[[dict], Any]) -> Deferred:
    """Call C{handler} with the body of every event whose topic matches C{regex}
    (RE2 semantics, searched anywhere in the topic unless anchored). Fires
    with the L{magnet.Subscription}; an invalid regex fails at once."""
    from ooidx.routing import compile_filter  # RE2; imported late so emitting needs none of it

    matches = compile_filter(regex)

    def on_message(message: Message) -> Any:
        topic = message.headers.get(TOPIC_HEADER)
        if message.type != EVENT or not isinstance(topic, str) or not matches(topic):
            return None
        return maybeDeferred(handler, message.json())

    return bus.subscribe(NOTIFICATION, on_message)
