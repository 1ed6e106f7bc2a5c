"""What a transport must do, so that every pattern in L{magnet.bus} works on both.

The interface is deliberately AMQP-shaped (queues, exchanges, the default
exchange routing by queue name, publisher confirms, manual acks) because
RabbitMQ is the production transport; the in-process broker
(L{magnet.memory}) imitates exactly these semantics.

Transports own reconnection: they remember every declaration and every
consumer made through them, and after a reconnect they declare the topology
again and resume each consumer under the same L{Consumer} object.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred

from magnet.message import Message

DEFAULT_EXCHANGE = ""

#: RabbitMQ's sender-selected distribution: a publish to a direct exchange
#: (the default exchange included) is also routed with each routing key of
#: these headers (arrays of strings). The broker keeps C{CC} on what it
#: delivers and removes C{BCC}, so consumers never see the list. A
#: C{mandatory} publish is returned only when it reached no queue at all.
CC_HEADER = "CC"
BCC_HEADER = "BCC"


class Delivery(Protocol):
    """A message handed to a consumer, to be acknowledged exactly once."""

    message: Message
    queue: str
    redelivered: bool

    def ack(self) -> None:
        """The message is done with. A no-op if the link that brought it is gone."""

    def nack(self, requeue: bool = True) -> None:
        """Give the message back (C{requeue}) or drop it."""


class Consumer(Protocol):
    """A registered consumer; survives reconnects."""

    queue: str

    def cancel(self) -> Deferred:
        """Stop deliveries. As in RabbitMQ, what the consumer holds stays its
        own to ack or nack; only what is still unacknowledged when the link
        closes goes back to the queue."""


OnDelivery = Callable[[Delivery], None]
LinkListener = Callable[[bool], None]


class Transport(Protocol):
    """A link to a broker.

    Every method that talks to the broker returns a Deferred. When the link is
    down, declarations and publishes wait for it up to the transport's
    C{operation_timeout}, then fail with L{magnet.errors.NotConnected}; a
    publish whose confirm is outstanding when the link drops fails with
    L{magnet.errors.ConnectionLost}.
    """

    #: True while the link is up.
    connected: bool

    def start(self) -> None:
        """Begin connecting (and keep reconnecting with backoff)."""

    def stop(self) -> Deferred:
        """Close the link cleanly; stop reconnecting."""

    def when_connected(self, timeout: Optional[float] = None) -> Deferred:
        """Fires once the link is up (at once if it already is)."""

    def add_link_listener(self, listener: LinkListener) -> None:
        """C{listener(True)} after every (re)connect and topology replay,
        C{listener(False)} whenever the link goes down."""

    # Optional (both magnet transports have them): C{blocked}, the broker's
    # reason while it blocks publishers (a memory or disk alarm), else None;
    # C{add_block_listener(listener)}: C{listener(reason)} when the block
    # starts, C{listener(None)} when it ends. L{magnet.bus.Bus.blocked} and
    # L{magnet.bus.Bus.add_block_listener} use them when they are there.

    def declare_queue(
        self,
        name: str,
        *,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: Optional[Mapping[str, Any]] = None,
    ) -> Deferred:
        """Fires with None once the queue exists. Remembered for replay."""

    def declare_exchange(self, name: str, kind: str = "fanout", *, durable: bool = True,
                         remember: bool = True) -> Deferred:
        """C{kind} is 'fanout' or 'direct'. Remembered for replay, unless not C{remember}."""

    def bind_queue(self, queue: str, exchange: str, routing_key: str = "", *, remember: bool = True) -> Deferred:
        """Remembered for replay, unless not C{remember} (durable bindings the
        broker keeps itself, reconciled by their owner)."""

    def unbind_queue(self, queue: str, exchange: str, routing_key: str = "") -> Deferred:
        """Remove a binding and forget it. No error when it was not there, even
        when the queue or the exchange does not exist (as RabbitMQ answers)."""

    def bind_exchange(self, destination: str, source: str, routing_key: str = "", *,
                      remember: bool = True) -> Deferred:
        """What C{source} routes with C{routing_key} goes through C{destination}
        as well (RabbitMQ's C{exchange.bind}, the routing key kept; a mandatory
        publish is returned only when no queue is reached through any of them).
        Remembered for replay unless not C{remember}."""

    def unbind_exchange(self, destination: str, source: str, routing_key: str = "") -> Deferred:
        """Remove an exchange-to-exchange binding and forget it; no error when it was not
        there, even when an exchange does not exist (as RabbitMQ answers)."""

    def delete_queue(self, name: str) -> Deferred:
        """Delete a queue and forget it (no replay)."""

    def delete_exchange(self, name: str) -> Deferred:
        """Delete an exchange and forget it (no replay), with every binding it is
        the source or the destination of."""

    def publish(
        self,
        exchange: str,
        routing_key: str,
        message: Message,
        *,
        mandatory: bool = True,
    ) -> Deferred:
        """Fires once the broker has taken the message (publisher confirm).

        Fails with L{Unroutable} if C{mandatory} and no queue took it, with
        L{NotConfirmed} on a broker nack, with L{ConnectionLost} if the link
        dropped before the confirm.
        """

    def existing_queues(self, names: Sequence[str]) -> Deferred:
        """Fires with the set of C{names} that are queues at the broker now
        (a queue exclusive to another connection counts: it takes publishes).
        Declares nothing and remembers nothing."""

    def consume(self, queue: str, on_delivery: OnDelivery, *, prefetch: int = 10, no_ack: bool = False) -> Deferred:
        """Fires with a L{Consumer}. C{on_delivery} is called synchronously for
        every delivery, in order; at most C{prefetch} are unacknowledged at once.

        C{no_ack}: the broker counts a message as delivered once it has sent
        it (no ack from this side; C{ack()} and C{nack()} of its deliveries
        do nothing, and what arrives after the consumer is cancelled is
        dropped). Only for a queue whose messages die with the link anyway,
        such as a caller's private reply queue (exclusive, auto-delete)."""
