"""user_pub_sub: people's subscriptions to dataset versions (kind "datasets").

At subscribe it asks pub_sub for a durable subscription named
C{user.PERSON.ID} with the person's regex; pub_sub's address for it
(C{pubsub.sub.user.PERSON.ID}) then receives every matching dataset version
as a stream (the .dods bytes; docs/dissemination.md) and every small
C{publication}. A dataset version is far too big to hand to a person, so for
each stream this component puts a small JSON notice into the person's queue
C{user.PERSON.ID}:

    {"topic": "dataset.NAME", "dataset": "NAME", "url": BASE, "fetched": T, "length": BYTES}

taken from the stream's start (so the notice says a version was fetched; the
persister's C{event.saved.NAME} says it was saved). The stream's chunks are
acknowledged and dropped as they arrive, so nothing big is ever held. A
publication is passed on as its JSON body C{{"topic", "message"}}.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from twisted.internet.defer import inlineCallbacks, succeed
from twisted.logger import Logger

from magnet import Message, RemoteError, Unroutable
from magnet import stream as magnet_stream

from ooidx.events import TOPIC_HEADER
from ooidx.people.component import PersonalSubscriptions
from ooidx.people.records import ID_HEADER, InvalidSubscription, message_id
from ooidx import wire

__all__ = ["UserPubSub", "NOTICE_FIELDS"]

NOTICE_FIELDS = ("topic", "dataset", "url", "fetched", "length")
PUBLICATION = wire.PUBLICATION


class UserPubSub(PersonalSubscriptions):
    log = Logger()
    kind = "datasets"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sources: Dict[str, Any] = {}  # person's queue -> consumer of its pub_sub address
        self.notices = 0

    @inlineCallbacks
    def prepare(self, record: Dict[str, Any]) -> Any:
        try:
            answer = yield self.bus.call("pub_sub", "subscribe", regex=record["regex"], name=record["queue"])
        except RemoteError as e:
            if e.remote_type == "InvalidRegex":
                raise InvalidSubscription(e.message) from None
            raise
        if not isinstance(answer, dict) or not isinstance(answer.get("address"), str):
            raise InvalidSubscription("pub_sub answered the subscription without an address")
        record["source"] = answer["address"]

    @inlineCallbacks
    def release(self, record: Dict[str, Any]) -> Any:
        yield self.bus.call("pub_sub", "unsubscribe", name=record["queue"])

    @inlineCallbacks
    def activate(self, record: Dict[str, Any]) -> Any:
        source = record.get("source")
        if not isinstance(source, str):
            self.log.warn("{component}: subscription {queue} has no pub_sub address", component=self.name,
                          queue=record["queue"])
            return
        queue = record["queue"]
        subscription = yield self.bus.consume(source, lambda m: self.on_source_message(queue, m), prefetch=50)
        self._sources[queue] = subscription

    def deactivate(self, record: Dict[str, Any]) -> Any:
        subscription = self._sources.pop(record["queue"], None)
        return subscription.cancel() if subscription is not None else succeed(None)

    def on_source_message(self, queue: str, message: Message) -> Any:
        if message.type in (magnet_stream.DATA, magnet_stream.END, magnet_stream.ABORT):
            return None  # the bytes of a version: the person gets the notice, not these
        if message.type == magnet_stream.START:
            notice = self._notice(message)
        elif message.type == PUBLICATION:
            notice = message.json()
        else:
            self.log.info("{component}: ignoring a {type} message for {queue}", component=self.name,
                          type=message.type, queue=queue)
            return None
        if not isinstance(notice, dict):
            self.log.warn("{component}: ignoring a message for {queue} that is not a JSON object",
                          component=self.name, queue=queue)
            return None
        topic = notice.get("topic") if isinstance(notice.get("topic"), str) else ""
        out = Message.of_json(notice, type="dataset", headers={TOPIC_HEADER: topic,
                                                               ID_HEADER: message_id(self.clock.seconds())})
        d = self.bus.send(queue, out)
        self.notices += 1

        def gone(failure: Any) -> Optional[Any]:
            if failure.check(Unroutable):
                self.log.info("{component}: {queue} is gone; notice not kept", component=self.name, queue=queue)
                return None
            return failure

        return d.addErrback(gone)

    @staticmethod
    def _notice(message: Message) -> Any:
        try:
            metadata = message.json()
        except Exception:
            return None
        if not isinstance(metadata, dict):
            return None
        return {k: metadata.get(k) for k in NOTICE_FIELDS}
