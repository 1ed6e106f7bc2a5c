"""user_notification: people's subscriptions to events (kind "events").

It hears the C{notification} fanout through one shared queue
(C{user_notification.events}, competing consumers, so each event is routed
once however many instances run), matches the event's topic against every
person's regex in one pass (L{ooidx.routing.Router}, an RE2 Set) and sends the
event into the durable, bounded queue of each matching subscription
(C{user.PERSON.ID}) in one multicast (L{magnet.Bus.multicast}), stamped with a sortable id for SSE's C{Last-Event-ID}.

Events caused by a failing webhook (they carry C{webhook_subscription}) go
to subscriptions read as streams only, never to webhook subscriptions, so
failing webhooks cannot feed each other an endless stream of failures.
"""
from __future__ import annotations

from typing import Any, Dict

from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.logger import Logger

from magnet import Message
from magnet.multicast import MAX_ADDRESSES

from ooidx.events import EVENT, NOTIFICATION, TOPIC_HEADER
from ooidx.routing import Router
from ooidx.people.component import PersonalSubscriptions
from ooidx.people.records import ID_HEADER, WEBHOOK_DETAIL, message_id
from ooidx import wire

__all__ = ["UserNotification", "EVENTS_QUEUE"]

#: The shared queue on the notification fanout that user_notification consumes.
EVENTS_QUEUE = wire.USER_EVENTS_QUEUE
#: Its bound: events waiting while no user_notification runs (the oldest dropped).
EVENTS_QUEUE_LENGTH = 100_000


class UserNotification(PersonalSubscriptions):
    log = Logger()
    kind = "events"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.router = Router()
        self.routed = 0

    @inlineCallbacks
    def setUp(self) -> Any:
        yield self.bus.declare_fanout(NOTIFICATION)
        yield self.bus.transport.declare_queue(EVENTS_QUEUE, durable=True, arguments={
            "x-max-length": EVENTS_QUEUE_LENGTH, "x-overflow": "drop-head"})
        yield self.bus.transport.bind_queue(EVENTS_QUEUE, NOTIFICATION)
        yield super().setUp()
        for _ in range(self.instances):
            self._subscriptions.append((yield self.bus.consume(EVENTS_QUEUE, self.on_event)))

    def activate(self, record: Dict[str, Any]) -> None:
        self.router.add(record["queue"], record["regex"])
        # made now, maybe on another node: look at it again before the next multicast
        self.bus.forget_addresses((record["queue"],))

    def deactivate(self, record: Dict[str, Any]) -> None:
        self.router.remove(record["queue"])

    def on_event(self, message: Message) -> Any:
        topic = message.headers.get(TOPIC_HEADER)
        if message.type != EVENT or not isinstance(topic, str):
            self.log.info("{component}: ignoring a {type} message without an event topic", component=self.name,
                          type=message.type)
            return None
        queues = self.router.match(topic)
        if not queues:
            return None
        from_webhook = False
        try:
            body = message.json()
            from_webhook = isinstance(body, dict) and WEBHOOK_DETAIL in body
        except Exception:
            self.log.warn("{component}: ignoring event {topic}: its body is not JSON", component=self.name,
                          topic=topic)
            return None
        out = Message(body=message.body, content_type=message.content_type, type=EVENT,
                      headers={TOPIC_HEADER: topic, ID_HEADER: message_id(self.clock.seconds())})
        targets = []
        for queue in sorted(queues):
            record = self.records.get(queue)
            if record is None or (from_webhook and record.get("webhook")):
                continue
            targets.append(queue)
        self.routed += 1
        if not targets:
            return None
        # one multicast for every matching person (magnet.Bus.multicast; one per
        # MAX_ADDRESSES of them); a copy not confirmed fails the handler, so the
        # event is retried as a whole
        sends = [self.bus.multicast(targets[i:i + MAX_ADDRESSES], out).addCallback(self._sent, topic)
                 for i in range(0, len(targets), MAX_ADDRESSES)]
        if len(sends) == 1:
            return sends[0]
        return DeferredList(sends, fireOnOneErrback=True, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure)

    def _sent(self, result: Any, topic: str) -> None:
        for queue in result.unroutable:  # the subscription went meanwhile
            self.log.info("{component}: {queue} is gone; event {topic} not kept", component=self.name,
                          queue=queue, topic=topic)
