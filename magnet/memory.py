"""An in-process broker with RabbitMQ's semantics, for the embedded default.

The whole exchange can run in one process with no broker installed, and the
fast test tier runs every pattern here. It keeps to what magnet relies on in
RabbitMQ: durable queues with competing consumers and round-robin delivery,
per-consumer prefetch, manual acks, requeue on nack or cancel (redelivered
flag set), fanout and direct exchanges, exchange-to-exchange bindings
(RabbitMQ's C{exchange.bind}: the routing key kept, each exchange visited
once; deleting an exchange removes the bindings it is the source or the
destination of), mandatory publishes that fail when nothing routes, exclusive and auto-delete queues, publisher confirms, and
sender-selected distribution (the C{CC} and C{BCC} headers: more routing
keys on a direct exchange; C{BCC} removed before delivery; a mandatory
publish fails only when no queue at all took it).

Deliveries are always made from a later reactor turn, never from inside
C{publish} or C{ack}, as a network broker would; that keeps handlers free of
re-entrancy surprises that only this transport would show. The turns are
zero-delay calls on the broker's clock, so on a L{twisted.internet.task.Clock}
a test decides when they run: L{magnet.testing} is that test harness.

Flow control: a queue holding more than L{HIGH_WATER_BYTES} of ready messages
withholds publisher confirms until it drains, as RabbitMQ's credit flow
slows a fast publisher. Senders that wait for confirms (streams do) therefore
keep memory bounded whatever the size of what they send.
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from magnet.errors import Blocked, MagnetError, NotConnected, Unroutable
from magnet.message import Message
from magnet.transport import BCC_HEADER, CC_HEADER, DEFAULT_EXCHANGE, LinkListener, OnDelivery

HIGH_WATER_BYTES = 4 * 1024 * 1024
LOW_WATER_BYTES = 1 * 1024 * 1024


class ChannelError(MagnetError):
    """What RabbitMQ would answer with a channel close (NOT_FOUND, RESOURCE_LOCKED)."""


class MemoryDelivery:
    __slots__ = ("message", "queue", "redelivered", "_consumer", "_tag", "_done")

    def __init__(self, message: Message, queue: str, redelivered: bool, consumer: "MemoryConsumer", tag: int) -> None:
        self.message = message
        self.queue = queue
        self.redelivered = redelivered
        self._consumer = consumer
        self._tag = tag
        self._done = False

    def ack(self) -> None:
        if not self._done:
            self._done = True
            self._consumer._settle(self._tag, requeue=None)

    def nack(self, requeue: bool = True) -> None:
        if not self._done:
            self._done = True
            self._consumer._settle(self._tag, requeue=requeue)

    def __repr__(self) -> str:
        return f"<MemoryDelivery {self.queue} tag={self._tag}>"


class MemoryConsumer:
    def __init__(self, queue: "_Queue", on_delivery: OnDelivery, prefetch: int, owner: "MemoryTransport",
                 no_ack: bool = False) -> None:
        self.queue = queue.name
        self._queue = queue
        self._on_delivery = on_delivery
        #: the broker counts a delivery done once sent (see L{magnet.transport.Transport.consume})
        self.no_ack = no_ack
        self.prefetch = 0 if no_ack else prefetch
        self.owner = owner
        self.unacked: Dict[int, Tuple[Message, int]] = {}
        self.active = True
        self._tags = itertools.count(1)

    def has_room(self) -> bool:
        return self.active and (self.prefetch <= 0 or len(self.unacked) < self.prefetch)

    def _deliver(self, message: Message, redelivered: bool, size: int) -> None:
        tag = next(self._tags)
        delivery = MemoryDelivery(message, self.queue, redelivered, self, tag)
        if self.no_ack:
            delivery._done = True  # settled as it leaves the queue: ack() and nack() do nothing
        else:
            self.unacked[tag] = (message, size)
        try:
            self._on_delivery(delivery)
        except Exception:
            self.owner.log.failure("consumer of {queue} raised from on_delivery", queue=self.queue)

    def _settle(self, tag: int, requeue: Optional[bool]) -> None:
        entry = self.unacked.pop(tag, None)
        if entry is None:
            return
        if requeue:
            self._queue.requeue([entry])
        self._queue.schedule()

    def cancel(self) -> Deferred:
        if self.active:
            self.active = False
            self._queue.remove_consumer(self)
        return succeed(None)

    def disconnect(self) -> None:
        """The connection closed: whatever it held goes back to the queue."""
        self.active = False
        self._queue.remove_consumer(self, requeue_unacked=True)


class _Queue:
    def __init__(self, broker: "MemoryBroker", name: str, durable: bool, exclusive_owner: Optional["MemoryTransport"],
                 auto_delete: bool, arguments: Mapping[str, Any]) -> None:
        self.broker = broker
        self.name = name
        self.durable = durable
        self.exclusive_owner = exclusive_owner
        self.auto_delete = auto_delete
        self.arguments = dict(arguments)
        self.ready: deque = deque()  # (message, redelivered, size)
        self.ready_bytes = 0
        self.consumers: List[MemoryConsumer] = []
        self._rr = 0
        self._scheduled = None
        self._had_consumer = False
        self._withheld: List[Deferred] = []
        self.deleted = False

    def put(self, message: Message) -> None:
        size = len(message.body)
        self.ready.append((message, False, size))
        self.ready_bytes += size
        self._bound()
        self.schedule()

    def _bound(self) -> None:
        # RabbitMQ's x-max-length counts ready messages; with x-overflow
        # drop-head (its default) the oldest ready ones are dropped.
        limit = self.arguments.get("x-max-length")
        if not isinstance(limit, int) or self.arguments.get("x-overflow", "drop-head") != "drop-head":
            return
        while len(self.ready) > max(limit, 0):
            _, _, dropped = self.ready.popleft()
            self.ready_bytes -= dropped

    def requeue(self, entries: List[Tuple[Message, int]]) -> None:
        # Requeued messages go back to the head, as in RabbitMQ, keeping their order.
        for message, size in reversed(entries):
            self.ready.appendleft((message, True, size))
            self.ready_bytes += size
        self.schedule()

    def over_high_water(self) -> bool:
        return self.ready_bytes > HIGH_WATER_BYTES

    def withhold(self, d: Deferred) -> None:
        self._withheld.append(d)

    def schedule(self) -> None:
        if self._scheduled is None and not self.deleted:
            self._scheduled = self.broker.clock.callLater(0, self._pump)

    def _pump(self) -> None:
        self._scheduled = None
        consumers = self.consumers
        # One turn delivers at most what was ready when it began: a message a
        # consumer gives back at once (nack with requeue inside on_delivery)
        # goes out again on a later turn, not in an endless loop inside this one.
        budget = len(self.ready)
        while budget and self.ready and consumers:
            consumer = self._next_with_room()
            if consumer is None:
                break
            budget -= 1
            message, redelivered, size = self.ready.popleft()
            self.ready_bytes -= size
            consumer._deliver(message, redelivered, size)
        if self._withheld and self.ready_bytes <= LOW_WATER_BYTES:
            withheld, self._withheld = self._withheld, []
            for d in withheld:
                d.callback(None)

    def _next_with_room(self) -> Optional[MemoryConsumer]:
        if self.arguments.get("x-single-active-consumer"):
            # RabbitMQ's single active consumer: the earliest consumer gets
            # everything; the next one takes over only when it goes.
            first = self.consumers[0]
            return first if first.has_room() else None
        n = len(self.consumers)
        for i in range(n):
            consumer = self.consumers[(self._rr + i) % n]
            if consumer.has_room():
                self._rr = (self._rr + i + 1) % n
                return consumer
        return None

    def add_consumer(self, consumer: MemoryConsumer) -> None:
        self.consumers.append(consumer)
        self._had_consumer = True
        self.schedule()

    def remove_consumer(self, consumer: MemoryConsumer, requeue_unacked: bool = False) -> None:
        """As in RabbitMQ, a cancelled consumer may still ack what it holds;
        only closing the connection gives unacknowledged messages back."""
        if consumer in self.consumers:
            self.consumers.remove(consumer)
        if requeue_unacked:
            unacked = sorted(consumer.unacked.items())
            consumer.unacked.clear()
            if unacked:
                self.requeue([entry for _, entry in unacked])
        if self.auto_delete and self._had_consumer and not self.consumers:
            self.broker.delete_queue(self.name)

    def drop(self) -> None:
        self.deleted = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        for consumer in list(self.consumers):
            consumer.active = False
        self.consumers = []
        self.ready.clear()
        withheld, self._withheld = self._withheld, []
        for d in withheld:
            d.callback(None)


class MemoryBroker:
    """The shared state of one in-process broker; transports are its connections."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.queues: Dict[str, _Queue] = {}
        self.exchanges: Dict[str, Tuple[str, set]] = {}
        #: source exchange -> {(destination exchange, routing key)} (RabbitMQ's exchange.bind)
        self.exchange_bindings: Dict[str, set] = {}
        #: the connections started on this broker (told when it blocks publishers)
        self.transports: List["MemoryTransport"] = []
        #: why the broker blocks publishers (as RabbitMQ's connection.blocked says), None when it does not
        self.blocked: Optional[str] = None

    def block(self, reason: str = "low on memory") -> None:
        """Block publishers, as RabbitMQ does on a memory or disk alarm
        (C{connection.blocked} with C{reason}): every publish is held until
        L{unblock}, or until its sender gives up (the bus's send timeout
        cancels it), when it fails with L{Blocked}, naming the alarm.
        Consuming and acking go on. Each connection's block listeners are told."""
        self.blocked = reason
        for transport in list(self.transports):
            transport._blocked_changed(reason)

    def unblock(self) -> None:
        """Lift the block (C{connection.unblocked}): the held publishes go out, in order."""
        self.blocked = None
        for transport in list(self.transports):
            transport._blocked_changed(None)

    def declare_queue(self, name: str, owner: "MemoryTransport", durable: bool, exclusive: bool,
                      auto_delete: bool, arguments: Mapping[str, Any]) -> None:
        existing = self.queues.get(name)
        if existing is not None:
            if existing.exclusive_owner is not None and existing.exclusive_owner is not owner:
                raise ChannelError(f"RESOURCE_LOCKED: queue {name!r} is exclusive to another connection")
            return
        self.queues[name] = _Queue(self, name, durable, owner if exclusive else None, auto_delete, arguments or {})

    def delete_queue(self, name: str) -> None:
        queue = self.queues.pop(name, None)
        if queue is None:
            return
        queue.drop()
        for _, bindings in self.exchanges.values():
            for binding in [b for b in bindings if b[0] == name]:
                bindings.discard(binding)

    def declare_exchange(self, name: str, kind: str) -> None:
        if kind not in ("fanout", "direct"):
            raise ChannelError(f"COMMAND_INVALID: unknown exchange type {kind!r}")
        existing = self.exchanges.get(name)
        if existing is not None:
            if existing[0] != kind:
                raise ChannelError(f"PRECONDITION_FAILED: exchange {name!r} is {existing[0]}, not {kind}")
            return
        self.exchanges[name] = (kind, set())

    def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        if queue not in self.queues:
            raise ChannelError(f"NOT_FOUND: no queue {queue!r}")
        if exchange not in self.exchanges:
            raise ChannelError(f"NOT_FOUND: no exchange {exchange!r}")
        self.exchanges[exchange][1].add((queue, routing_key))

    def unbind(self, queue: str, exchange: str, routing_key: str) -> None:
        """As RabbitMQ: no error for a binding that is not there, even when its queue or exchange is not."""
        if exchange in self.exchanges:
            self.exchanges[exchange][1].discard((queue, routing_key))

    def bind_exchange(self, destination: str, source: str, routing_key: str) -> None:
        for name in (destination, source):
            if name not in self.exchanges:
                raise ChannelError(f"NOT_FOUND: no exchange {name!r}")
        self.exchange_bindings.setdefault(source, set()).add((destination, routing_key))

    def unbind_exchange(self, destination: str, source: str, routing_key: str) -> None:
        """As RabbitMQ: no error for a binding that is not there, even when its exchanges are not."""
        self.exchange_bindings.get(source, set()).discard((destination, routing_key))

    def delete_exchange(self, name: str) -> None:
        """The exchange and every binding it is the source or the destination of."""
        self.exchanges.pop(name, None)
        self.exchange_bindings.pop(name, None)
        for bindings in self.exchange_bindings.values():
            for binding in [b for b in bindings if b[0] == name]:
                bindings.discard(binding)

    def route(self, exchange: str, routing_key: str) -> List[_Queue]:
        if exchange == DEFAULT_EXCHANGE:
            queue = self.queues.get(routing_key)
            return [queue] if queue is not None else []
        if exchange not in self.exchanges:
            raise ChannelError(f"NOT_FOUND: no exchange {exchange!r}")
        # through exchange-to-exchange bindings too (each exchange once), the routing key kept
        names: set = set()
        seen = {exchange}
        todo = [exchange]
        while todo:
            current = todo.pop()
            kind, bindings = self.exchanges.get(current, ("", set()))
            names.update(q for q, key in bindings if kind == "fanout" or key == routing_key)
            for destination, key in self.exchange_bindings.get(current, ()):
                if (kind == "fanout" or key == routing_key) and destination not in seen:
                    seen.add(destination)
                    todo.append(destination)
        return [self.queues[n] for n in sorted(names) if n in self.queues]

    def route_message(self, exchange: str, routing_key: str, message: Message) -> Tuple[List[_Queue], Message]:
        """The queues C{message} goes to, and the message as they get it.

        As RabbitMQ's sender-selected distribution: the routing keys of the
        C{CC} and C{BCC} headers (arrays of strings) route the message too,
        each queue gets one copy however many keys name it, and C{BCC} is
        removed from what is delivered. A header of another type is refused,
        as RabbitMQ refuses it."""
        headers = message.headers
        if CC_HEADER not in headers and BCC_HEADER not in headers:
            return self.route(exchange, routing_key), message
        keys = [routing_key]
        for name in (CC_HEADER, BCC_HEADER):
            value = headers.get(name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)):
                raise ChannelError(f"PRECONDITION_FAILED: unacceptable type in header {name!r}: "
                                   f"{type(value).__name__} (an array of strings is expected)")
            keys.extend(k for k in value if isinstance(k, str))
        kind = DEFAULT_EXCHANGE if exchange == DEFAULT_EXCHANGE else self.exchanges.get(exchange, ("", None))[0]
        if kind == "fanout":
            queues = self.route(exchange, routing_key)
        else:
            seen: Dict[str, _Queue] = {}
            for key in keys:
                for queue in self.route(exchange, key):
                    seen.setdefault(queue.name, queue)
            queues = list(seen.values())
        if BCC_HEADER in headers:
            message = message.evolve(headers={k: v for k, v in headers.items() if k != BCC_HEADER})
        return queues, message

    def disconnect(self, owner: "MemoryTransport") -> None:
        for consumer in owner.consumers:
            consumer.disconnect()
        owner.consumers.clear()
        for name, queue in list(self.queues.items()):
            if queue.exclusive_owner is owner:
                self.delete_queue(name)


_brokers: Dict[str, MemoryBroker] = {}


def broker_for(url: str, clock: IReactorTime) -> MemoryBroker:
    """The process-wide broker a C{memory://NAME} URL names (created on first use)."""
    name = url.split("://", 1)[1].strip("/") if "://" in url else ""
    broker = _brokers.get(name)
    if broker is None:
        broker = _brokers[name] = MemoryBroker(clock)
    return broker


def reset_brokers() -> None:
    """Forget every in-process broker (tests use this between cases)."""
    _brokers.clear()


class MemoryTransport:
    """One connection to a L{MemoryBroker}. It never drops unless stopped."""

    log = Logger()

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.connected = False
        self._stopped = False
        self._listeners: List[LinkListener] = []
        self._block_listeners: List[Callable[[Optional[str]], None]] = []
        self._held: List[Tuple[Deferred, Callable[[], Deferred]]] = []
        self.consumers: List[MemoryConsumer] = []

    # link ---------------------------------------------------------------

    def start(self) -> None:
        self._stopped = False
        self.connected = True
        if self not in self.broker.transports:
            self.broker.transports.append(self)
        for listener in list(self._listeners):
            listener(True)

    def stop(self) -> Deferred:
        if self in self.broker.transports:
            self.broker.transports.remove(self)
        if self.connected:
            self.connected = False
            self._stopped = True
            self.broker.disconnect(self)
            held, self._held = self._held, []
            for d, _ in held:
                d.errback(NotConnected("memory transport stopped while the broker blocked publishers"))
            for listener in list(self._listeners):
                listener(False)
        return succeed(None)

    @property
    def blocked(self) -> Optional[str]:
        """The broker's reason while it blocks publishers (L{MemoryBroker.block}), else None."""
        return self.broker.blocked if self.connected else None

    def add_block_listener(self, listener: Callable[[Optional[str]], None]) -> None:
        """C{listener(reason)} when the broker starts blocking publishers, C{listener(None)} when it stops."""
        self._block_listeners.append(listener)

    def _blocked_changed(self, reason: Optional[str]) -> None:
        if reason is None:
            held, self._held = self._held, []
            for d, publish in held:
                publish().chainDeferred(d)
        for listener in list(self._block_listeners):
            try:
                listener(reason)
            except Exception:
                self.log.failure("block listener {listener!r} raised", listener=listener)

    def when_connected(self, timeout: Optional[float] = None) -> Deferred:
        if self.connected:
            return succeed(None)
        return fail(NotConnected("memory transport is not started"))

    def add_link_listener(self, listener: LinkListener) -> None:
        self._listeners.append(listener)

    # topology -----------------------------------------------------------

    def _do(self, action: Callable[[], Any]) -> Deferred:
        if not self.connected:
            return fail(NotConnected("memory transport is not started"))
        try:
            return succeed(action())
        except MagnetError as e:
            return fail(e)

    def declare_queue(self, name: str, *, durable: bool = True, exclusive: bool = False,
                      auto_delete: bool = False, arguments: Optional[Mapping[str, Any]] = None) -> Deferred:
        return self._do(lambda: self.broker.declare_queue(name, self, durable, exclusive, auto_delete, arguments or {}))

    def declare_exchange(self, name: str, kind: str = "fanout", *, durable: bool = True,
                         remember: bool = True) -> Deferred:
        return self._do(lambda: self.broker.declare_exchange(name, kind))

    def bind_queue(self, queue: str, exchange: str, routing_key: str = "", *, remember: bool = True) -> Deferred:
        return self._do(lambda: self.broker.bind(queue, exchange, routing_key))

    def delete_queue(self, name: str) -> Deferred:
        return self._do(lambda: self.broker.delete_queue(name))

    def delete_exchange(self, name: str) -> Deferred:
        return self._do(lambda: self.broker.delete_exchange(name))

    def unbind_queue(self, queue: str, exchange: str, routing_key: str = "") -> Deferred:
        return self._do(lambda: self.broker.unbind(queue, exchange, routing_key))

    def bind_exchange(self, destination: str, source: str, routing_key: str = "", *,
                      remember: bool = True) -> Deferred:
        return self._do(lambda: self.broker.bind_exchange(destination, source, routing_key))

    def unbind_exchange(self, destination: str, source: str, routing_key: str = "") -> Deferred:
        return self._do(lambda: self.broker.unbind_exchange(destination, source, routing_key))

    # messages -----------------------------------------------------------

    def publish(self, exchange: str, routing_key: str, message: Message, *, mandatory: bool = True) -> Deferred:
        if not self.connected:
            return fail(NotConnected("memory transport is not started"))
        reason = self.broker.blocked
        if reason is not None:
            return self._hold(reason, exchange, routing_key, message, mandatory)
        return self._publish(exchange, routing_key, message, mandatory)

    def _hold(self, reason: str, exchange: str, routing_key: str, message: Message, mandatory: bool) -> Deferred:
        """As the AMQP transport: a publish while the broker blocks publishers waits for the
        block to lift; a sender that gives up first (cancels) gets L{Blocked} naming the alarm."""
        entry: List[Any] = []

        def give_up(d: Deferred) -> None:
            if entry and entry[0] in self._held:
                self._held.remove(entry[0])
            d.errback(Blocked(f"publish to exchange {exchange!r} with routing key {routing_key!r} not sent: the "
                              f"broker blocks publishers ({reason}; connection.blocked)"))

        held: Deferred = Deferred(give_up)
        entry.append((held, lambda: self._publish(exchange, routing_key, message, mandatory)))
        self._held.append(entry[0])
        return held

    def _publish(self, exchange: str, routing_key: str, message: Message, mandatory: bool) -> Deferred:
        try:
            queues, message = self.broker.route_message(exchange, routing_key, message)
        except MagnetError as e:
            return fail(e)
        if not queues:
            if mandatory:
                where = f"exchange {exchange!r}" if exchange else f"address {routing_key!r}"
                return fail(Unroutable(f"NO_ROUTE: nothing is bound to {where}"))
            return succeed(None)
        confirm = succeed(None)
        for queue in queues:
            queue.put(message)
            if queue.over_high_water() and confirm.called:
                confirm = Deferred()
                queue.withhold(confirm)
        return confirm

    def existing_queues(self, names: Sequence[str]) -> Deferred:
        """The set of C{names} that are queues now (see L{magnet.transport.Transport.existing_queues})."""
        if not self.connected:
            return fail(NotConnected("memory transport is not started"))
        queues = self.broker.queues
        return succeed({name for name in names if name in queues})

    def consume(self, queue: str, on_delivery: OnDelivery, *, prefetch: int = 10, no_ack: bool = False) -> Deferred:
        if not self.connected:
            return fail(NotConnected("memory transport is not started"))
        q = self.broker.queues.get(queue)
        if q is None:
            return fail(ChannelError(f"NOT_FOUND: no queue {queue!r}"))
        if q.exclusive_owner is not None and q.exclusive_owner is not self:
            return fail(ChannelError(f"RESOURCE_LOCKED: queue {queue!r} is exclusive to another connection"))
        consumer = MemoryConsumer(q, on_delivery, prefetch, self, no_ack=no_ack)
        self.consumers.append(consumer)
        q.add_consumer(consumer)
        return succeed(consumer)
