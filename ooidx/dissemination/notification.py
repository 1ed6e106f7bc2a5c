"""notification: the fanout of events, and the memory of the most recent ones.

Events are small JSON messages sent to the C{notification} fanout by
L{ooidx.events.emit} (docs/dissemination.md). This component hears every one
(each instance its own copy), keeps the most recent in a bounded ring, and
answers C{recent(regex=None, limit=100)} on the worker queue
C{notification.api}: the matching events, oldest first.

"Send me all events matching this regex" is L{ooidx.events.subscribe} (for
components) and user_notification (for people).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from magnet import Message, operation

from ooidx.component import Component
from ooidx.events import EVENT, TOPIC_HEADER
from ooidx.routing import compile_filter
from ooidx import wire

__all__ = ["Notification", "API", "RING_SIZE", "MAX_LIMIT"]

#: The worker queue the ring is read on.
API = wire.NOTIFICATION_API
#: How many events the ring keeps by default.
RING_SIZE = 1000
#: The most events one C{recent} answers with.
MAX_LIMIT = 1000


class Notification(Component):
    """The notification fanout's listener: a ring of recent events, served on C{notification.api}."""

    log = Logger()

    def __init__(self, name: str, bus: Any, *, node: str, instances: int = 1, clock: Any = None,
                 reactor: Any = None, ring_size: int = RING_SIZE) -> None:
        super().__init__(name, bus, node=node, instances=instances, clock=clock, reactor=reactor)
        self.ring: Deque[Dict[str, Any]] = deque(maxlen=ring_size)
        self.received = 0
        self.dropped = 0

    @inlineCallbacks
    def setUp(self) -> Any:
        yield self.bus.declare_worker_queue(API)
        self._subscriptions.append((yield self.bus.serve(API, self)))

    def on_fanout_message(self, message: Message) -> None:
        topic = message.headers.get(TOPIC_HEADER)
        if message.type != EVENT or not isinstance(topic, str):
            self.dropped += 1
            self.log.info("{component}: ignoring a {type} message without an event topic",
                          component=self.name, type=message.type)
            return
        try:
            body = message.json()
        except Exception as e:
            self.dropped += 1
            self.log.warn("{component}: ignoring event {topic}: {error}", component=self.name, topic=topic, error=e)
            return
        if not isinstance(body, dict):
            self.dropped += 1
            self.log.warn("{component}: ignoring event {topic}: its body is not a JSON object",
                          component=self.name, topic=topic)
            return
        body.setdefault("topic", topic)
        self.received += 1
        self.ring.append(body)

    @operation
    def recent(self, regex: Optional[str] = None, limit: int = 100) -> List[Dict[str, Any]]:
        """The most recent events (at most C{limit}, oldest first) whose topic
        C{regex} matches (RE2, searched anywhere unless anchored); all of them
        when C{regex} is None. L{ooidx.errors.InvalidRegex} for a bad regex."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
        matches = compile_filter(regex) if regex is not None else None
        found: List[Dict[str, Any]] = []
        for event in reversed(self.ring):
            if matches is None or matches(str(event.get("topic", ""))):
                found.append(event)
                if len(found) >= limit:
                    break
        found.reverse()
        return found
