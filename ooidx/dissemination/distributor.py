"""The distributor: "send this message to this list of listeners".

A message to the C{distributor} fanout (docs/dissemination.md) has type
C{distribute}, the header C{addresses} (a list of address strings) and, as
its body, the message to deliver. The distributor component does not take
the fanout with a private queue per instance (every instance would send a
copy): all instances, on every node, compete for one shared durable queue
C{distributor.work} bound to the fanout, so each message is distributed once.

Delivery: the body, its content type, correlation and message ids and its
other headers (all but C{addresses} and C{deliver_type}) go to every listed
address as one message of type C{deliver_type} (when given), sent with
C{mandatory}. An address nobody holds any more (L{Unroutable}) is logged and
skipped; the others still get theirs. Addresses that fail otherwise (a
timeout, a lost link) are retried by putting a C{distribute} message with
only those addresses back on the work queue, up to the bus's retry limit,
then dead-lettered, so an address that got its copy never gets a second.
A malformed C{distribute} message (no or bad C{addresses} header, wrong
type) is dead-lettered (C{distributor.work.dead}) at once.
"""
from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, inlineCallbacks, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from magnet import BadMessage, Bus, Message, Unroutable
from magnet.bus import ATTEMPT_HEADER, ERROR_HEADER, ORIGIN_HEADER

from ooidx.component import Component
from ooidx import wire

__all__ = ["Distributor", "DISTRIBUTOR", "WORK_QUEUE", "DISTRIBUTE", "ADDRESSES_HEADER", "TYPE_HEADER",
           "declare_work_queue", "distribute_message", "MAX_ADDRESSES_PER_MESSAGE"]

DISTRIBUTOR = "distributor"
WORK_QUEUE = wire.DISTRIBUTOR_WORK
DISTRIBUTE = wire.DISTRIBUTE
ADDRESSES_HEADER = wire.ADDRESSES_HEADER
TYPE_HEADER = wire.DELIVER_TYPE_HEADER

#: Addresses per distribute message: a longer list is split over several
#: messages (an AMQP content header must fit in one frame).
MAX_ADDRESSES_PER_MESSAGE = 500

#: Sends in flight at once for one distribute message.
CONCURRENT_SENDS = 64

_OWN_HEADERS = (ADDRESSES_HEADER, TYPE_HEADER, ATTEMPT_HEADER, ERROR_HEADER, ORIGIN_HEADER)


def declare_work_queue(bus: Bus) -> Deferred:
    """The C{distributor} fanout and the shared queue C{distributor.work}
    bound to it. Senders declare it too, so that what they send waits for a
    distributor that is still starting instead of being unroutable."""
    d = bus.declare_fanout(DISTRIBUTOR)
    d.addCallback(lambda _: bus.declare_worker_queue(WORK_QUEUE))
    d.addCallback(lambda _: bus.transport.bind_queue(WORK_QUEUE, DISTRIBUTOR))
    return d


def distribute_message(addresses: List[str], message: Message) -> Message:
    """The C{distribute} message that asks for C{message} to go to each of C{addresses}."""
    headers: Dict[str, Any] = dict(message.headers)
    headers[ADDRESSES_HEADER] = list(addresses)
    if message.type is not None:
        headers[TYPE_HEADER] = message.type
    return message.evolve(type=DISTRIBUTE, headers=headers)


def distribute(bus: Bus, addresses: List[str], message: Message) -> Deferred:
    """Hand C{message} to the distributor for every address (several
    C{distribute} messages when the list is long); fires with the count sent."""
    chunks = [addresses[i:i + MAX_ADDRESSES_PER_MESSAGE]
              for i in range(0, len(addresses), MAX_ADDRESSES_PER_MESSAGE)]
    sends = [bus.send(DISTRIBUTOR, distribute_message(chunk, message)) for chunk in chunks]
    d = DeferredList(sends, fireOnOneErrback=True, consumeErrors=True)

    def unwrap(failure: Failure) -> Failure:
        return failure.value.subFailure if hasattr(failure.value, "subFailure") else failure

    return d.addCallbacks(lambda _: len(chunks), unwrap)


def parse(message: Message) -> tuple:
    """(addresses, the message to deliver) of a distribute message; L{BadMessage} if malformed."""
    if message.type != DISTRIBUTE:
        raise BadMessage(f"expected a message of type {DISTRIBUTE!r}, got {message.type!r}")
    addresses = message.header(ADDRESSES_HEADER)
    if isinstance(addresses, tuple):
        addresses = list(addresses)
    if not isinstance(addresses, list):
        raise BadMessage(f"header {ADDRESSES_HEADER!r} must be a list of addresses, got {type(addresses).__name__}")
    clean: List[str] = []
    for a in addresses:
        if isinstance(a, bytes):
            try:
                a = a.decode("utf-8")
            except UnicodeDecodeError:
                raise BadMessage(f"header {ADDRESSES_HEADER!r} holds an address that is not UTF-8") from None
        if not isinstance(a, str) or not a or len(a.encode("utf-8")) > 255:
            raise BadMessage(f"header {ADDRESSES_HEADER!r} holds a bad address {a!r}")
        clean.append(a)
    deliver_type = message.headers.get(TYPE_HEADER)
    if isinstance(deliver_type, bytes):
        deliver_type = deliver_type.decode("utf-8", "replace")
    if deliver_type is not None and not isinstance(deliver_type, str):
        raise BadMessage(f"header {TYPE_HEADER!r} must be a string, got {type(deliver_type).__name__}")
    headers = {k: v for k, v in message.headers.items() if k not in _OWN_HEADERS}
    body = message.evolve(type=deliver_type, headers=headers)
    # each address once, in order
    return list(dict.fromkeys(clean)), body


class Distributor(Component):
    """Competing consumers of C{distributor.work}: each message goes out once."""

    log = Logger()

    def __init__(self, name: str, bus: Bus, *, node: str, instances: int = 1, clock: Any = None,
                 reactor: Any = None, concurrency: int = CONCURRENT_SENDS) -> None:
        super().__init__(name, bus, node=node, instances=instances, clock=clock, reactor=reactor)
        self.concurrency = concurrency
        #: counters, for tests and stats
        self.stats = {"messages": 0, "delivered": 0, "unroutable": 0, "retried": 0, "dead": 0}

    @inlineCallbacks
    def start(self) -> Any:
        """Like L{Component.start}, but one shared queue instead of a private
        subscription per instance (see the module's docstring)."""
        yield maybeDeferred(self.setUp)
        yield declare_work_queue(self.bus)
        for _ in range(self.instances):
            self._subscriptions.append((yield self.bus.consume(WORK_QUEUE, self.on_distribute)))
        self._subscriptions.append((yield self.serve_operations()))  # ping (distributor.ops)
        self.started = True
        self.log.info("{component} started on {node} ({instances} consumer(s) of {queue})",
                      component=self.name, node=self.node, instances=self.instances, queue=WORK_QUEUE)

    def on_distribute(self, message: Message) -> Deferred:
        """Send one distribute message's body to each of its addresses."""
        addresses, body = parse(message)  # BadMessage: dead-lettered by the bus
        self.stats["messages"] += 1
        semaphore = DeferredSemaphore(max(1, self.concurrency))
        failed: List[str] = []
        reasons: List[str] = []

        def one(address: str) -> Deferred:
            d = semaphore.run(self.bus.send, address, body, mandatory=True)

            def sent(_: Any) -> None:
                self.stats["delivered"] += 1

            def not_sent(failure: Failure) -> None:
                if failure.check(Unroutable):
                    self.stats["unroutable"] += 1
                    self.log.warn("{component}: address {address} is gone (unroutable); skipped",
                                  component=self.name, address=address)
                    return
                failed.append(address)
                reasons.append(f"{address}: {failure.type.__name__}: {failure.getErrorMessage()}")

            return d.addCallbacks(sent, not_sent)

        d = DeferredList([one(a) for a in addresses], consumeErrors=True)
        d.addCallback(lambda _: self._retry(message, failed, reasons) if failed else None)
        return d

    def _retry(self, message: Message, failed: List[str], reasons: List[str]) -> Deferred:
        attempt = message.headers.get(ATTEMPT_HEADER, 0)
        attempt = attempt + 1 if isinstance(attempt, int) else 1
        again = message.with_headers(**{ADDRESSES_HEADER: failed, ATTEMPT_HEADER: attempt})
        reason = "; ".join(reasons)[:1000]
        if attempt > self.bus.retry_limit:
            self.stats["dead"] += 1
            self.log.error("{component}: giving up on {count} address(es) after {attempt} attempt(s): {reason}",
                           component=self.name, count=len(failed), attempt=attempt, reason=reason)
            dead = again.with_headers(**{ERROR_HEADER: reason, ORIGIN_HEADER: WORK_QUEUE})
            return self.bus.send(WORK_QUEUE + ".dead", dead)
        self.stats["retried"] += 1
        self.log.warn("{component}: {count} address(es) failed (attempt {attempt}), retrying them: {reason}",
                      component=self.name, count=len(failed), attempt=attempt, reason=reason)
        return self.bus.send(WORK_QUEUE, again)

    def on_fanout_message(self, message: Message) -> Any:  # not used: see start
        return self.on_distribute(message)
