"""Publishing to pub_sub's subscribers in one hop, for code outside pub_sub.

    publisher = Publisher(bus)
    result = yield publisher.publish("dataset.sst", {"url": ...})
    # {"topic": "dataset.sst", "via": "exchange"}: the broker confirmed it, and
    # it reached every subscription bound to the topic; or "via": "pub_sub"

A publication goes straight to the direct exchange C{pubsub.topics}
(L{ooidx.wire.PUBSUB_TOPICS}) with its topic as routing key: persistent,
C{mandatory}, with a publisher confirm. pub_sub binds there each topic it
has published (see L{ooidx.dissemination.pub_sub}) to a fanout of its own
bound to the address of every subscription matching the topic, before the
topic's own binding, so the broker delivers a publication to all of them in
the one publish, or, when the topic is not bound (never published yet,
unbound to make room, or no subscriber), returns it whole. A returned
publication was delivered nowhere: it is then posted to pub_sub's
C{publish} operation (persistent, confirmed: L{magnet.Bus.post}), which
binds the topic and delivers it, so the next one goes in one hop.

What the one hop does not give: the list of the addresses that are gone
(pub_sub's C{publish} answers it); a subscription made on another pub_sub
instance is bound to the topics this instance knows once that instance has
told it (the C{pubsub.changed} fanout), as its router learns of it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from magnet import Bus, Unroutable

from ooidx.dissemination.pub_sub import TOPICS, bindable, check_topic, publication

__all__ = ["Publisher", "publish"]


class Publisher:
    """Publishes to pub_sub's subscribers over C{bus}, one broker operation each when the topic is bound."""

    def __init__(self, bus: Bus, *, service: str = "pub_sub", timeout: Optional[float] = None) -> None:
        self.bus = bus
        self.service = service
        self.timeout = timeout
        self._ready = False
        self._declaring: Optional[List[Deferred]] = None
        #: publications that went in one hop, and those posted to pub_sub
        self.counts: Dict[str, int] = {"exchange": 0, "pub_sub": 0}

    def _declare(self) -> Deferred:
        """A Deferred of its own for each caller: fires once C{TOPICS} is declared
        (a publish to an exchange that does not exist closes the channel)."""
        if self._ready:
            return succeed(None)
        mine: Deferred = Deferred()
        if self._declaring is None:
            self._declaring = [mine]
            self.bus.declare_direct(TOPICS).addBoth(self._declared_now)
        else:
            self._declaring.append(mine)
        return mine

    def _declared_now(self, result: Any) -> None:
        waiting, self._declaring = self._declaring or [], None
        if not isinstance(result, Failure):
            self._ready = True
        for d in waiting:  # on a failure, the next publish tries again
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)

    def publish(self, topic: str, message: Any = None) -> Deferred:
        """Deliver C{message} under C{topic} to every matching subscription;
        fires once the broker (or pub_sub's queue) has it, with C{{"topic", "via"}}.
        L{ooidx.dissemination.pub_sub.InvalidTopic} / C{MessageTooLarge} for
        bad input; the bus's errors (L{magnet.Timeout}, ...) when not confirmed.
        (Plain callbacks, not inlineCallbacks: it is on every publication's path.)"""
        try:
            check_topic(topic)
            out = publication(topic, message)
        except Exception:
            return fail()
        if not bindable(topic):
            return self._post(topic, message)
        if not self._ready:
            return self._declare().addCallback(lambda _: self._one_hop(topic, message, out))
        return self._one_hop(topic, message, out)

    def _one_hop(self, topic: str, message: Any, out: Any) -> Deferred:
        d = self.bus.send_to(TOPICS, topic, out, mandatory=True, timeout=self.timeout)
        return d.addCallbacks(self._sent, self._returned, callbackArgs=(topic,), errbackArgs=(topic, message))

    def _sent(self, _: Any, topic: str) -> Dict[str, str]:
        self.counts["exchange"] += 1
        return {"topic": topic, "via": "exchange"}

    def _returned(self, failure: Failure, topic: str, message: Any) -> Any:
        failure.trap(Unroutable)  # returned whole: delivered nowhere; anything else is the caller's
        return self._post(topic, message)

    def _post(self, topic: str, message: Any) -> Deferred:
        d = self.bus.post(self.service, "publish", topic=topic, message=message)
        return d.addCallback(self._posted, topic)

    def _posted(self, _: Any, topic: str) -> Dict[str, str]:
        self.counts["pub_sub"] += 1
        return {"topic": topic, "via": "pub_sub"}


def publish(bus: Bus, topic: str, message: Any = None) -> Deferred:
    """L{Publisher.publish} once (a L{Publisher} kept for many saves a declaration each)."""
    return Publisher(bus).publish(topic, message)
