"""The patterns of the Data Exchange over one transport.

A L{Bus} is a Twisted service. Components declare names (worker queues and
fanouts), consume and subscribe, send, call and serve operations, listen on
private addresses and stream payloads, and never see AMQP. Every wait has a
timeout and every failure arrives as a typed L{magnet.errors} exception.

Handler contract: a handler gets a L{Message} and returns a value or a
Deferred. The message is acknowledged only after that succeeds. If it fails,
the message is published again with its attempt count raised, up to
C{retry_limit} attempts, then put on the name's dead-letter queue
(C{NAME.dead}) with the error in its headers; an undecodable message
(L{BadMessage}) is dead-lettered at once, since retrying cannot help.

The bus dead-letters by publishing to C{NAME.dead} itself (mandatory, through
the default exchange: no binding, no broker dead-letter exchange), so a
dead-letter queue deleted alone (C{rabbitmqctl delete_queue fetcher.dead}) has
no consumer whose cancel would tell, and every message dead-lettered then
would be unroutable. So the bus keeps them: right after every (re)connect and
then every C{dead_letter_check} seconds (the heartbeat's, through
L{magnet.connect}) it asks the broker (L{Transport.existing_queues}, a passive
C{queue.declare}) whether the dead-letter queue of every worker queue it
consumes is there, and declares the missing ones again; a dead-letter publish
that finds its queue gone declares it again and publishes once more. Each
such declaration is logged (one line) and counted
(L{BusObserver.dead_letter_queue_redeclared}).
"""
from __future__ import annotations

import itertools
import math
import time
import uuid
from collections import deque
from types import CoroutineType
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from magnet import multicast as _multicast, rpc, stream
from magnet.errors import (BadMessage, ConnectionLost, MagnetError, NotConnected, Refusal, RemoteError, Timeout,
                           Unroutable)
from magnet.message import Message
from magnet.observer import BusObserver
from magnet.transport import DEFAULT_EXCHANGE, Delivery, Transport

Handler = Callable[[Message], Any]

WORKER = "worker"
FANOUT = "fanout"
DIRECT = "direct"
ATTEMPT_HEADER = "x-magnet-attempt"
ERROR_HEADER = "x-magnet-error"
ORIGIN_HEADER = "x-magnet-origin"
DEAD_SUFFIX = ".dead"
SHARED_DEAD_LETTERS = "magnet.dead-letters"

#: Durable addresses carry streams, and a stream must reach one consumer
#: whole: several consumers of one durable address take turns as RabbitMQ's
#: single active consumer (failover), never splitting a stream's chunks.
DURABLE_ADDRESS_ARGUMENTS = {"x-single-active-consumer": True}


class Subscription:
    """A running consumer made through the bus; C{cancel} stops it."""

    def __init__(self, bus: "Bus", name: str) -> None:
        self.bus = bus
        self.name = name
        self._consumer: Any = None
        self.cancelled = False

    def cancel(self) -> Deferred:
        if self.cancelled:
            return succeed(None)
        self.cancelled = True
        self.bus._subscriptions.discard(self)
        if self._consumer is None:
            return succeed(None)
        return self._consumer.cancel()


class Listener:
    """A private address (queue) made on demand, and what arrives at it.

    Messages go to the handler given to L{Bus.listen}, or wait to be taken
    with L{get}; streams wait to be taken with L{next_stream}. Until taken, a
    message stays unacknowledged, so the prefetch bounds what is held here.
    """

    def __init__(self, bus: "Bus", address: str, handler: Optional[Handler], idle_timeout: float,
                 on_stream: Optional[Callable[[stream.Stream], Any]] = None) -> None:
        self.bus = bus
        self._on_stream = on_stream
        self.address = address
        self._handler = handler
        self._idle_timeout = idle_timeout
        self._messages: Deque[Delivery] = deque()
        self._getters: Deque[Deferred] = deque()
        self._streams: Dict[str, stream.Stream] = {}
        self._new_streams: Deque[stream.Stream] = deque()
        self._stream_getters: Deque[Deferred] = deque()
        self.subscription: Optional[Subscription] = None

    def get(self, timeout: Optional[float] = None) -> Deferred:
        """The next plain message at this address (acknowledged once taken)."""
        if self._messages:
            delivery = self._messages.popleft()
            delivery.ack()
            return succeed(delivery.message)
        d = self._waiter(self._getters, timeout, "a message")
        return d

    def next_stream(self, timeout: Optional[float] = None) -> Deferred:
        """The next stream to start arriving at this address."""
        if self._new_streams:
            return succeed(self._new_streams.popleft())
        return self._waiter(self._stream_getters, timeout, "a stream")

    def _waiter(self, waiters: Deque[Deferred], timeout: Optional[float], what: str) -> Deferred:
        timeout = self.bus.rpc_timeout if timeout is None else timeout
        d: Deferred = Deferred(lambda d: waiters.remove(d) if d in waiters else None)
        waiters.append(d)

        def timed_out(failure: Failure, t: float) -> Failure:
            raise Timeout(f"no {what} arrived at {self.address} within {t} s")

        d.addTimeout(timeout, self.bus.clock, onTimeoutCancel=lambda r, t: timed_out(r, t))
        return d

    def close(self) -> Deferred:
        """Stop listening and delete the address."""
        self.bus._private_listeners.discard(self)
        d = self.subscription.cancel() if self.subscription else succeed(None)
        d.addCallback(lambda _: self.bus.transport.delete_queue(self.address))
        return d

    def _link_lost(self, exc: Exception) -> None:
        """The link went down: a private address lost what was on its way (the
        broker deletes an exclusive queue with its connection), so the streams
        arriving here can never end: fail them now rather than at their idle timeout."""
        streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            s._fail(exc)

    def _on_message(self, message: Message, delivery: Delivery) -> Optional[Deferred]:
        if message.type in stream.STREAM_TYPES:
            return self._on_stream_message(message)
        if self._handler is not None:
            return _run(self._handler, message)
        if self._getters:
            self._getters.popleft().callback(message)
            return None
        self._messages.append(delivery)
        return _HELD

    def _stream_closed(self, sid: str) -> None:
        # only the stream that closed (finished): never a live one under the same id
        s = self._streams.get(sid)
        if s is not None and s._finished:
            del self._streams[sid]

    def _on_stream_message(self, message: Message) -> Deferred:
        sid = message.headers.get(stream.STREAM_HEADER)
        if not isinstance(sid, str):
            raise BadMessage(f"stream message without a {stream.STREAM_HEADER!r} header")
        if message.type == stream.START:
            seq = message.headers.get(stream.SEQ_HEADER, 0)
            if isinstance(seq, bool) or not isinstance(seq, int):
                raise BadMessage(f"stream start whose {stream.SEQ_HEADER!r} header is not an integer: {seq!r}"[:200])
            if sid in self._streams:
                # a second start of a stream that is arriving (a redelivery, or a sender
                # reusing an id): the stream goes on as it was, this message is dropped
                self.bus.log.info("dropping a second start of stream {sid} at {address}", sid=sid,
                                  address=self.address)
                return succeed(None)
            s = stream.Stream(sid, message.json(), message.correlation_id, self.bus.clock,
                              self._idle_timeout, self._stream_closed)
            s._expected = seq + 1
            self._streams[sid] = s
            if self._on_stream is not None:
                return maybeDeferred(self._on_stream, s).addErrback(
                    lambda f: self.bus.log.failure("stream handler at {address} failed", f, address=self.address))
            if self._stream_getters:
                self._stream_getters.popleft().callback(s)
            else:
                self._new_streams.append(s)
            return succeed(None)
        s = self._streams.get(sid)
        if s is None:
            self.bus.log.info("dropping {kind} of stream {sid} at {address}: stream unknown or already closed",
                              kind=message.type, sid=sid, address=self.address)
            return succeed(None)
        return s._arrived(message.type, message)


#: A sentinel: the listener keeps the delivery and acknowledges it itself later.
_HELD = object()


class Bus(Service):
    """One process's link to the bus and the patterns over it."""

    log = Logger()

    def __init__(
        self,
        transport: Transport,
        *,
        clock: IReactorTime,
        node: str = "node",
        rpc_timeout: float = 30.0,
        send_timeout: float = 30.0,
        retry_limit: int = 3,
        prefetch: int = 10,
        shutdown_timeout: float = 10.0,
        stream_idle_timeout: float = 60.0,
        queue_type: str = "classic",
        observer: Optional[BusObserver] = None,
        address_recheck: float = 10.0,
        dead_letter_check: float = 30.0,
    ) -> None:
        self.transport = transport
        self.clock = clock
        self.node = node
        self.rpc_timeout = rpc_timeout
        self.send_timeout = send_timeout
        self.retry_limit = retry_limit
        self.prefetch = prefetch
        self.shutdown_timeout = shutdown_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self.queue_type = queue_type
        self.observer = observer or BusObserver()
        self._kinds: Dict[str, str] = {}
        self._subscriptions: set = set()
        self._inflight = 0  # handlers running now
        self._idle_waiters: List[Deferred] = []  # fired when no handler runs
        self._pending_calls: Dict[str, "_Call"] = {}
        self._deadlines = _Deadlines(clock)
        self._timed_out_sends: set = set()
        self._call_ids = itertools.count(1)
        self._call_prefix = uuid.uuid4().hex[:16] + "."
        self._reply_listener = _Shared(self._make_reply_address)
        self._reply_to: Optional[str] = None
        self._dead_letters_declared = _Shared(
            lambda: self.transport.declare_queue(SHARED_DEAD_LETTERS, durable=True))
        self._private_listeners: set = set()  # listen addresses that die with the link
        self._accepting = True
        #: which addresses exist at the broker, for L{multicast}
        self.addresses = _multicast.AddressBook(self, address_recheck)
        #: seconds between two checks that the consumed worker queues' dead-letter queues exist (0: never)
        self.dead_letter_check = dead_letter_check
        self._dead_letter_loop: Optional[LoopingCall] = None
        self._checking_dead_letters: Optional[Deferred] = None
        #: dead-letter queues declared again because they were gone, since the start
        self.dead_letter_queues_redeclared = 0
        transport.add_link_listener(self._link_changed)

    # lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._accepting = True
        self.transport.start()

    def stopService(self) -> Deferred:
        """Stop consuming, let in-flight handlers finish (bounded), close the link."""
        super().stopService()
        self._accepting = False
        self._stop_dead_letter_checks()
        cancels = [s.cancel() for s in list(self._subscriptions)]
        d = DeferredList(cancels, consumeErrors=True)
        d.addCallback(lambda _: self._wait_inflight())
        d.addCallback(lambda _: self._fail_pending(ConnectionLost("the bus is stopping")))
        d.addCallback(lambda _: self.transport.stop())
        d.addErrback(lambda f: self.log.failure("while stopping the bus", f))
        return d

    def _wait_inflight(self) -> Deferred:
        if not self._inflight:
            return succeed(None)
        self.log.info("waiting up to {timeout} s for {count} in-flight handlers",
                      timeout=self.shutdown_timeout, count=self._inflight)
        waits: Deferred = Deferred(lambda d: self._idle_waiters.remove(d) if d in self._idle_waiters else None)
        self._idle_waiters.append(waits)
        waits.addTimeout(self.shutdown_timeout, self.clock)
        waits.addErrback(lambda _: self.log.warn(
            "{count} handlers still running after {timeout} s; their messages will be redelivered",
            count=self._inflight, timeout=self.shutdown_timeout))
        return waits

    def _handler_done(self, name: str) -> None:
        self._inflight -= 1
        self.observer.inflight(name, -1)
        if self._inflight == 0 and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def _link_changed(self, up: bool) -> None:
        if up:
            if self._dead_letter_loop is not None:
                self.check_dead_letter_queues()  # after every reconnect
            return
        if not up:
            self._fail_pending(ConnectionLost("connection to the broker lost while waiting for a reply"))
            for listener in list(self._private_listeners):
                listener._link_lost(ConnectionLost("connection to the broker lost during the stream"))

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending_calls = self._pending_calls, {}
        for cid, call in pending.items():
            self._deadlines.remove(cid)
            call.finish(self, Failure(exc))

    def when_connected(self, timeout: Optional[float] = None) -> Deferred:
        return self.transport.when_connected(self.send_timeout if timeout is None else timeout)

    @property
    def blocked(self) -> Optional[str]:
        """The broker's reason while it blocks publishers (RabbitMQ's memory or disk
        alarm, C{connection.blocked}: "low on memory"), else None. Every send and
        call waits (then fails) while it lasts; a caller that must answer quickly
        (an HTTP edge) answers at once instead."""
        return getattr(self.transport, "blocked", None)

    def add_block_listener(self, listener: Callable[[Optional[str]], None]) -> None:
        """C{listener(reason)} when the broker starts blocking publishers,
        C{listener(None)} when it stops (a transport that cannot tell never calls it)."""
        add = getattr(self.transport, "add_block_listener", None)
        if callable(add):
            add(listener)

    def pending(self) -> Dict[str, int]:
        """What this bus is waiting on now, by kind: the Deferreds a leak would
        pile up, for a gauge (C{magnet_pending} on the daemon's /metrics) and
        a soak that watches it from outside.

        C{calls}: RPC calls waiting for their reply; C{sends}: sends waiting
        for the broker's confirm within the send timeout; C{handlers}:
        handlers running; C{listeners}: private listen addresses open (one
        per proxied request or stream being received); C{streams}: streams
        arriving at them; plus what the transport waits on (its own
        C{pending()}, e.g. C{unconfirmed} publishes and publishes C{held}
        while the broker blocks publishers)."""
        calls = len(self._pending_calls)
        out = {"calls": calls, "sends": max(0, len(self._deadlines) - calls), "handlers": self._inflight,
               "listeners": len(self._private_listeners),
               "streams": sum(len(listener._streams) for listener in list(self._private_listeners))}
        transport_pending = getattr(self.transport, "pending", None)
        if callable(transport_pending):
            out.update(transport_pending())
        return out

    # topology --------------------------------------------------------------

    def declare_worker_queue(self, name: str) -> Deferred:
        """One shared durable queue for C{name} (competing consumers), and its dead-letter queue."""
        self._kinds[name] = WORKER
        arguments = {"x-queue-type": "quorum"} if self.queue_type == "quorum" else None
        d = self.transport.declare_queue(name, durable=True, arguments=arguments)
        d.addCallback(lambda _: self.transport.declare_queue(name + DEAD_SUFFIX, durable=True, arguments=arguments))
        return d

    def declare_fanout(self, name: str) -> Deferred:
        """A fanout for C{name}: every subscriber gets its own copy of each message."""
        self._kinds[name] = FANOUT
        return self.transport.declare_exchange(name, "fanout", durable=True)

    def declare_direct(self, name: str) -> Deferred:
        """A durable direct exchange C{name}: what is sent to it with a routing
        key (L{send_to}) goes to whatever is bound with that key (queues, other
        exchanges: L{Transport.bind_queue}, L{Transport.bind_exchange})."""
        self._kinds[name] = DIRECT
        return self.transport.declare_exchange(name, "direct", durable=True)

    def kind_of(self, name: str) -> Optional[str]:
        return self._kinds.get(name)

    # sending ---------------------------------------------------------------

    def send(self, address: str, message: Message, *, mandatory: bool = True, timeout: Optional[float] = None) -> Deferred:
        """Publish to a worker queue, listen address or fanout. Fires once the
        broker has the message; fails with L{Unroutable} if nothing takes it."""
        if self._kinds.get(address) == FANOUT:
            exchange, key = address, ""
        else:
            exchange, key = DEFAULT_EXCHANGE, address
        return self._publish(exchange, key, address, message, mandatory, timeout)

    def send_to(self, exchange: str, routing_key: str, message: Message, *, mandatory: bool = True,
                timeout: Optional[float] = None) -> Deferred:
        """Publish to the exchange C{exchange} (a direct exchange: L{declare_direct})
        with C{routing_key}, confirmed as L{send}: fails with L{Unroutable} if
        C{mandatory} and the broker returned it (no queue reached through any
        binding), with L{Timeout} if not confirmed within C{timeout}."""
        if not isinstance(exchange, str) or not exchange:
            return fail(ValueError(f"send_to needs an exchange name, got {exchange!r}"))
        if not isinstance(routing_key, str):
            return fail(TypeError(f"a routing key is a string, got {type(routing_key).__name__}"))
        if len(routing_key.encode("utf-8", "surrogatepass")) > 255:
            return fail(ValueError(f"a routing key is at most 255 UTF-8 bytes, got {routing_key[:40]!r}..."))
        return self._publish(exchange, routing_key, exchange, message, mandatory, timeout)

    def _publish(self, exchange: str, key: str, address: str, message: Message, mandatory: bool,
                 timeout: Optional[float]) -> Deferred:
        d = self.transport.publish(exchange, key, message, mandatory=mandatory)
        self.observer.message_out(address)
        if d.called:  # the in-process broker confirms at once
            return d
        # One timer for all sends (L{_Deadlines}), not a DelayedCall each.
        timeout = self.send_timeout if timeout is None else timeout
        self._deadlines.add(d, timeout, self._send_expired, d)
        d.addBoth(self._send_settled, d, address, timeout)
        return d

    def _send_expired(self, d: Deferred) -> None:
        self._timed_out_sends.add(d)
        d.cancel()  # the transport's late confirm is then ignored

    def _send_settled(self, result: Any, d: Deferred, address: str, timeout: float) -> Any:
        self._deadlines.remove(d)
        if self._timed_out_sends and d in self._timed_out_sends:
            self._timed_out_sends.discard(d)
            if isinstance(result, Failure) and result.check(CancelledError):
                raise Timeout(f"send to {address!r} not confirmed within {timeout} s")
        return result

    def multicast(self, addresses: Sequence[str], message: Message, *, timeout: Optional[float] = None) -> Deferred:
        """Deliver C{message} to each of C{addresses} (durable or listen
        addresses, not fanouts) in one broker operation (several for a list
        too long for one AMQP header). Fires once the broker has confirmed it,
        with a L{magnet.multicast.MulticastResult} that names the addresses
        that got a copy and those that do not exist (no copy); fails with
        L{magnet.multicast.MulticastError} (naming the addresses concerned)
        if a publish was not confirmed within C{timeout} (the send timeout by
        default), and with TypeError / ValueError on a bad list (empty, not
        strings, an address twice, more than
        L{magnet.multicast.MAX_ADDRESSES}). Which addresses exist is known
        from a check at the broker at most C{address_recheck} seconds old:
        see L{magnet.multicast}."""
        return _multicast.multicast(self, self.addresses, addresses, message, timeout)

    def forget_addresses(self, addresses: Iterable[str]) -> None:
        """Check these addresses at the broker again on their next L{multicast}
        (someone just made or deleted them)."""
        self.addresses.forget(addresses)

    def send_json(self, address: str, value: Any, **properties: Any) -> Deferred:
        return self.send(address, Message.of_json(value, **properties))

    # consuming -------------------------------------------------------------

    def consume(self, name: str, handler: Handler, *, prefetch: Optional[int] = None) -> Deferred:
        """Compete for the messages of worker queue C{name}; fires with a L{Subscription}."""
        return self._consume(name, lambda m, _d: _run(handler, m), prefetch)

    def consume_deliveries(self, name: str, on_delivery: Callable[[Message, Delivery], None], *,
                           prefetch: Optional[int] = None) -> Deferred:
        """Consume C{name}, settling each message yourself (C{delivery.ack()} or
        C{delivery.nack()}), for consumers whose work on a message ends long
        after the call returns (a webhook retried with backoff, a browser
        reading a stream). If C{on_delivery} raises, the message is retried and
        dead-lettered as with L{consume}."""
        def handle(message: Message, delivery: Delivery) -> Any:
            on_delivery(message, delivery)
            return _HELD

        return self._consume(name, handle, prefetch)

    def subscribe(self, fanout: str, handler: Handler, *, prefetch: Optional[int] = None) -> Deferred:
        """Receive a copy of every message sent to fanout C{fanout} from now on."""
        queue = f"{fanout}.sub.{self.node}.{uuid.uuid4().hex[:12]}"
        d = self.declare_fanout(fanout)
        d.addCallback(lambda _: self.transport.declare_queue(queue, durable=False, exclusive=True, auto_delete=True))
        d.addCallback(lambda _: self.transport.bind_queue(queue, fanout))
        d.addCallback(lambda _: self.consume(queue, handler, prefetch=prefetch))
        return d

    def _consume(self, name: str, handle: Callable[[Message, Delivery], Any], prefetch: Optional[int],
                 no_ack: bool = False) -> Deferred:
        subscription = Subscription(self, name)
        self._subscriptions.add(subscription)

        def on_delivery(delivery: Delivery) -> None:
            self._handle(subscription, delivery, handle)

        prefetch = self.prefetch if prefetch is None else prefetch
        if no_ack:
            d = self.transport.consume(name, on_delivery, prefetch=prefetch, no_ack=True)
        else:  # transports written before no_ack need not know it
            d = self.transport.consume(name, on_delivery, prefetch=prefetch)

        def started(consumer: Any) -> Subscription:
            subscription._consumer = consumer
            if subscription.cancelled:
                consumer.cancel()
            elif self._kinds.get(name) == WORKER:
                self._start_dead_letter_checks()  # its dead-letter queue is kept from now on
            return subscription

        def failed(failure: Failure) -> Failure:
            self._subscriptions.discard(subscription)
            return failure

        return d.addCallbacks(started, failed)

    def _handle(self, subscription: Subscription, delivery: Delivery, handle: Callable[[Message, Delivery], Any]) -> None:
        name = subscription.name
        self.observer.message_in(name)
        if not self._accepting or subscription.cancelled:
            delivery.nack(requeue=True)
            return
        # Count the handler as in flight before it runs: it may call back into
        # code that stops the bus before it even returns.
        self._inflight += 1
        self.observer.inflight(name, +1)
        try:
            result = handle(delivery.message, delivery)
        except Exception:
            result = fail()
        if result is _HELD:
            self._handler_done(name)
            return
        if not isinstance(result, Deferred):
            # finished synchronously (the common case): no Deferred at all
            delivery.ack()
            self._handler_done(name)
            return
        result.addBoth(self._settle, name, delivery)

    def _settle(self, result: Any, name: str, delivery: Delivery) -> None:
        """A handler's Deferred fired: ack, or retry / dead-letter, then it is no longer in flight."""
        if not isinstance(result, Failure):
            delivery.ack()
            self._handler_done(name)
            return
        try:
            d = self._handler_failed(name, delivery, result)
        except Exception:
            d = fail()
        if d is None:
            self._handler_done(name)
            return
        d.addErrback(lambda f: self.log.failure("settling a message from {name}", f, name=name))
        d.addBoth(lambda _: self._handler_done(name))

    def _handler_failed(self, name: str, delivery: Delivery, failure: Failure) -> Optional[Deferred]:
        message = delivery.message
        self.observer.handler_error(name)
        attempt = message.headers.get(ATTEMPT_HEADER, 0)
        attempt = attempt + 1 if isinstance(attempt, int) else 1
        reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        if failure.check(BadMessage) or attempt > self.retry_limit:
            self.log.error("dead-lettering a message from {name} after {attempt} attempt(s): {reason}",
                           name=name, attempt=attempt, reason=reason)
            return self._dead_letter(delivery, reason)
        self.log.warn("handler for {name} failed (attempt {attempt} of {limit}), retrying: {reason}",
                      name=name, attempt=attempt, limit=self.retry_limit, reason=reason)
        again = message.with_headers(**{ATTEMPT_HEADER: attempt})
        d = self.transport.publish(DEFAULT_EXCHANGE, delivery.queue, again, mandatory=True)
        d.addCallbacks(lambda _: delivery.ack(), lambda f: self._settle_failed(delivery, f))
        return d

    def _dead_letter(self, delivery: Delivery, reason: str) -> Deferred:
        self.observer.dead_letter(delivery.queue)
        dead = delivery.message.with_headers(**{ERROR_HEADER: reason[:1000], ORIGIN_HEADER: delivery.queue})
        target = delivery.queue + DEAD_SUFFIX if self._kinds.get(delivery.queue) == WORKER else SHARED_DEAD_LETTERS
        d = self._ensure_shared_dead_letters() if target == SHARED_DEAD_LETTERS else succeed(None)
        d.addCallback(lambda _: self.transport.publish(DEFAULT_EXCHANGE, target, dead, mandatory=True))
        if target != SHARED_DEAD_LETTERS:
            d.addErrback(self._dead_letter_queue_gone, delivery.queue, dead)
        d.addCallbacks(lambda _: delivery.ack(), lambda f: self._settle_failed(delivery, f))
        return d

    def _dead_letter_queue_gone(self, failure: Failure, name: str, dead: Message) -> Deferred:
        """A dead-letter publish found no queue: C{NAME.dead} was deleted. Declare it again, publish once more."""
        failure.trap(Unroutable)
        d = self._declare_dead_letter_queue(name, "a message to dead-letter found it gone")
        d.addCallback(lambda _: self.transport.publish(DEFAULT_EXCHANGE, name + DEAD_SUFFIX, dead, mandatory=True))
        return d

    def _declare_dead_letter_queue(self, name: str, why: str) -> Deferred:
        self.dead_letter_queues_redeclared += 1
        self.log.warn("the dead-letter queue {queue!r} of worker queue {name!r} is gone at the broker ({why}); "
                      "declaring it again", queue=name + DEAD_SUFFIX, name=name, why=why)
        self.observer.dead_letter_queue_redeclared(name)
        arguments = {"x-queue-type": "quorum"} if self.queue_type == "quorum" else None
        return self.transport.declare_queue(name + DEAD_SUFFIX, durable=True, arguments=arguments)

    # the dead-letter queues of the worker queues consumed ----------------------------

    def _dead_letter_queues_wanted(self) -> Dict[str, str]:
        """C{NAME.dead} -> NAME, for every worker queue consumed here."""
        return {s.name + DEAD_SUFFIX: s.name for s in list(self._subscriptions)
                if not s.cancelled and self._kinds.get(s.name) == WORKER}

    def _start_dead_letter_checks(self) -> None:
        if self._dead_letter_loop is not None or self.dead_letter_check <= 0 or not self.running:
            return
        loop = LoopingCall(self.check_dead_letter_queues)
        loop.clock = self.clock
        self._dead_letter_loop = loop
        loop.start(self.dead_letter_check, now=False).addErrback(
            lambda f: self.log.failure("the dead-letter queue check stopped", f))

    def _stop_dead_letter_checks(self) -> None:
        loop, self._dead_letter_loop = self._dead_letter_loop, None
        if loop is not None and loop.running:
            loop.stop()

    def check_dead_letter_queues(self) -> Deferred:
        """Declare again the dead-letter queue of each worker queue consumed here
        that the broker no longer has (one pass at a time; never fails). Fires
        with the names of the worker queues whose dead-letter queue was declared again."""
        if self._checking_dead_letters is not None:
            return succeed([])
        wanted = self._dead_letter_queues_wanted()
        if not wanted or not getattr(self.transport, "connected", True) or self.blocked:
            return succeed([])
        redeclared: List[str] = []

        def compare(existing: Any) -> Deferred:
            missing = [dead for dead in sorted(wanted) if dead not in existing]
            declarations = []
            for dead in missing:
                name = wanted[dead]
                redeclared.append(name)
                declarations.append(self._declare_dead_letter_queue(name, "found by the periodic check"))
            return DeferredList(declarations, fireOnOneErrback=True, consumeErrors=True)

        def done(result: Any) -> List[str]:
            self._checking_dead_letters = None
            if isinstance(result, Failure):
                reason = result.value.subFailure if hasattr(result.value, "subFailure") else result
                self.log.warn("could not check the dead-letter queues {queues}: {reason}", queues=sorted(wanted),
                              reason=reason.getErrorMessage() if isinstance(reason, Failure) else reason)
            return redeclared

        d = self.transport.existing_queues(sorted(wanted)).addCallback(compare)
        self._checking_dead_letters = d
        d.addBoth(done)
        return d

    def _settle_failed(self, delivery: Delivery, failure: Failure) -> None:
        self.log.error("could not retry or dead-letter a message from {queue} ({reason}); giving it back to the broker",
                       queue=delivery.queue, reason=failure.getErrorMessage())
        delivery.nack(requeue=True)

    def _ensure_shared_dead_letters(self) -> Deferred:
        return self._dead_letters_declared.wait()

    # RPC -------------------------------------------------------------------

    def serve(self, name: str, service: object, *, prefetch: Optional[int] = None) -> Deferred:
        """Expose C{service}'s L{magnet.rpc.operation} methods on worker queue C{name}.

        Each call is answered at its C{reply_to}: the result, or an error reply
        with the exception's type and message. A failing operation is answered,
        not retried; a request with nowhere to reply is dead-lettered."""
        ops = rpc.operations(service)
        d = self.declare_worker_queue(name) if self._kinds.get(name) != WORKER else succeed(None)
        d.addCallback(lambda _: self._consume(name, lambda m, _d: self._answer(name, ops, m), prefetch))
        return d

    def _answer(self, name: str, ops: Dict[str, Callable[..., Any]], message: Message) -> Any:
        """Run a request's operation and answer it; a value (nothing to wait
        for: ack now) or a Deferred that fires once the reply is confirmed."""
        try:
            method, kwargs = rpc.resolve(ops, name, message)
            result = method(**kwargs)
        except Exception:
            return self._answer_failed(Failure(), name, message)
        if isinstance(result, Deferred):
            return result.addCallbacks(self._answer_value, self._answer_failed,
                                       callbackArgs=(name, message), errbackArgs=(name, message))
        if isinstance(result, (CoroutineType, Failure)):
            return maybeDeferred(lambda: result).addCallbacks(
                self._answer_value, self._answer_failed, callbackArgs=(name, message),
                errbackArgs=(name, message))
        return self._answer_value(result, name, message)

    def _answer_value(self, value: Any, name: str, message: Message) -> Any:
        if not message.reply_to:
            return None
        try:
            reply = rpc.reply(value, message.correlation_id)
        except (TypeError, ValueError) as e:
            return self._answer_failed(Failure(TypeError(f"result is not JSON-serializable: {e}")), name, message)
        return self._send_reply(name, message, reply)

    def _answer_failed(self, failure: Failure, name: str, message: Message) -> Any:
        if not message.reply_to:
            return fail(failure)  # send-only: retried, then dead-lettered, like any worker-queue message
        self.observer.handler_error(name)
        if failure.check(RemoteError, BadMessage, Refusal, LookupError, ValueError):
            # a lookup of a key that is not there is a routine answer (debug), not news
            emit = self.log.debug if failure.check(LookupError) else self.log.info
            emit("{name}: {op} refused: {error}", name=name, op=message.headers.get(rpc.OP_HEADER),
                 error=f"{failure.type.__name__}: {failure.getErrorMessage()}")
        elif failure.check(ConnectionLost, NotConnected, Timeout):
            # the operation's own sends or calls met a lost link, a node that paused or stopped, a peer that
            # did not answer in time: a fault of the moment, answered as such; no bug, so no traceback
            self.log.warn("{name}: {op} failed on the bus: {error}", name=name,
                          op=message.headers.get(rpc.OP_HEADER),
                          error=f"{failure.type.__name__}: {failure.getErrorMessage()}")
        else:
            self.log.failure("operation on {name} failed", failure, name=name)
        return self._send_reply(name, message, rpc.error_reply(failure, message.correlation_id))

    def _send_reply(self, name: str, message: Message, reply: Message) -> Deferred:
        d = self.transport.publish(DEFAULT_EXCHANGE, message.reply_to, reply, mandatory=True)
        if not d.called:
            d.addErrback(self._reply_failed, name, message.reply_to)
            return d
        result: List[Any] = []
        d.addBoth(result.append)
        if isinstance(result[0], Failure):
            self._reply_failed(result[0], name, message.reply_to)
        return None  # type: ignore[return-value]

    def _reply_failed(self, failure: Failure, name: str, reply_to: str) -> None:
        self.log.warn("reply from {name} to {reply_to} could not be delivered: {reason}",
                      name=name, reply_to=reply_to, reason=failure.getErrorMessage())

    def call(self, address: str, op: str, /, *, timeout: Optional[float] = None, **kwargs: Any) -> Deferred:
        """Call C{op} on the service at C{address} with keyword arguments; fires
        with its result, or fails with L{RemoteError}, L{Timeout},
        L{ConnectionLost} or L{Unroutable}."""
        return self.call_with(address, op, kwargs, timeout=timeout)

    def call_with(self, address: str, op: str, kwargs: Dict[str, Any], *, timeout: Optional[float] = None) -> Deferred:
        """L{call} with the arguments as a dict, for callers that relay
        arguments they did not write (any name, C{timeout} included)."""
        timeout = self.rpc_timeout if timeout is None else timeout
        # unique on this bus (the reply address is this bus's own): no uuid4 per call
        correlation_id = f"{self._call_prefix}{next(self._call_ids)}"
        d: Deferred = Deferred(lambda _: self._call_cancelled(correlation_id))
        call = _Call(d, address, op, time.monotonic())
        self._pending_calls[correlation_id] = call
        self._deadlines.add(correlation_id, timeout, self._call_expired, correlation_id, timeout)
        self.observer.message_out(address)
        reply_to = self._reply_to
        if reply_to is not None:
            self._publish_call(reply_to, address, op, kwargs, correlation_id)
        else:
            sent = self._reply_address()
            sent.addCallback(self._publish_call, address, op, kwargs, correlation_id)
            sent.addErrback(self._call_not_sent, correlation_id)
        return d

    def _publish_call(self, reply_to: str, address: str, op: str, kwargs: Dict[str, Any],
                      correlation_id: str) -> None:
        try:
            message = rpc.request(op, kwargs, reply_to=reply_to, correlation_id=correlation_id)
        except (TypeError, ValueError) as e:
            self._call_not_sent(Failure(TypeError(f"arguments of {address}.{op} are not JSON-serializable: {e}")),
                                correlation_id)
            return
        sent = self.transport.publish(DEFAULT_EXCHANGE, address, message, mandatory=True)
        sent.addErrback(self._call_not_sent, correlation_id)

    def _call_not_sent(self, failure: Failure, correlation_id: str) -> None:
        call = self._pending_calls.pop(correlation_id, None)
        if call is not None:
            self._deadlines.remove(correlation_id)
            call.finish(self, failure)

    def _call_expired(self, correlation_id: str, timeout: float) -> None:
        call = self._pending_calls.pop(correlation_id, None)
        if call is not None:
            call.finish(self, Failure(Timeout(f"{call.address}.{call.op} got no reply within {timeout} s")))

    def _call_cancelled(self, correlation_id: str) -> None:
        call = self._pending_calls.pop(correlation_id, None)
        if call is not None:
            self._deadlines.remove(correlation_id)
            self.observer.rpc_latency(call.address, call.op, time.monotonic() - call.started, "error")

    def tell(self, address: str, op: str, reply_to: str, /, *, correlation_id: Optional[str] = None,
             **kwargs: Any) -> Deferred:
        """Third-party coordination: ask C{address} to do C{op} and send the
        answer to C{reply_to}, someone else's address. Fires once the broker has
        the request; the third party decodes the reply with L{magnet.rpc.decode_reply}."""
        message = rpc.request(op, kwargs, reply_to=reply_to, correlation_id=correlation_id or uuid.uuid4().hex)
        return self.send(address, message)

    def post(self, address: str, op: str, /, **kwargs: Any) -> Deferred:
        """Send-only: ask C{address} to do C{op} and want no answer. Fires once
        the broker has the request. A failing operation is retried and then
        dead-lettered like any worker-queue message, since nobody waits for it."""
        # persistent: nobody waits for a post, so a broker restart must not lose it
        return self.send(address, rpc.request(op, kwargs, persistent=True))

    def _reply_address(self) -> Deferred:
        """The reply address, once made: the calls made meanwhile wait for the
        one being made; if it cannot be made, each fails with why and the next
        call tries again (L{_Shared})."""
        return self._reply_listener.wait()

    def _make_reply_address(self) -> Deferred:
        # Replies are consumed without acks (no-ack): the reply queue is this link's own
        # (exclusive, auto-delete), so a reply the link loses dies with the queue whether
        # acked or not, and an ack per call would only be one more frame for the broker.
        return self._listen(self._on_reply, prefetch=0, no_ack=True).addCallback(self._reply_listener_ready)

    def _reply_listener_ready(self, listener: Listener) -> str:
        self._reply_to = listener.address
        return listener.address

    def _on_reply(self, message: Message) -> None:
        cid = message.correlation_id or ""
        call = self._pending_calls.pop(cid, None)
        if call is None:
            self.log.debug("reply {cid} arrived after its call ended", cid=message.correlation_id)
            return
        self._deadlines.remove(cid)
        try:
            value = rpc.decode_reply(message)
        except MagnetError:
            call.finish(self, Failure())
        else:
            call.finish(self, value)

    # listen addresses and streams --------------------------------------------

    def listen(self, handler: Optional[Handler] = None, *, name: Optional[str] = None, shared: bool = False,
               durable: bool = False, prefetch: Optional[int] = None,
               on_stream: Optional[Callable[[stream.Stream], Any]] = None) -> Deferred:
        """Make an address others can send to; fires with a L{Listener}.

        Private by default (only this connection consumes it; it goes when the
        bus stops). C{shared}: other consumers may join it as a worker queue.
        C{durable}: it outlives its consumers, so what arrives while they are
        away is kept (a named durable subscription); its consumers take turns
        as a single active consumer, so streams arrive whole. C{on_stream} is called
        with each stream as it starts; without it, take streams with
        L{Listener.next_stream}."""
        return self._listen(handler, name=name, shared=shared, durable=durable, prefetch=prefetch,
                            on_stream=on_stream)

    def _listen(self, handler: Optional[Handler] = None, *, name: Optional[str] = None, shared: bool = False,
                durable: bool = False, prefetch: Optional[int] = None,
                on_stream: Optional[Callable[[stream.Stream], Any]] = None, no_ack: bool = False) -> Deferred:
        """L{listen}; C{no_ack} (a private address only): its messages are not
        acked (see L{magnet.transport.Transport.consume})."""
        if no_ack and (shared or durable):
            raise ValueError("no_ack is for a private address only")
        address = name or f"magnet.listen.{self.node}.{uuid.uuid4().hex}"
        listener = Listener(self, address, handler, self.stream_idle_timeout, on_stream)
        if durable:
            d = self.declare_address(address)
        else:
            d = self.transport.declare_queue(address, durable=False, exclusive=not shared, auto_delete=True)
        d.addCallback(lambda _: self._consume(address, listener._on_message, prefetch, no_ack))

        def ready(subscription: Subscription) -> Listener:
            listener.subscription = subscription
            if not durable and not shared:
                self._private_listeners.add(listener)
            return listener

        return d.addCallback(ready)

    def declare_address(self, name: str) -> Deferred:
        """A durable address (as L{listen} with C{durable=True} makes it), for
        a service that hands out addresses others will consume, such as a
        named subscription. Everyone declaring it must use this, since RabbitMQ
        refuses a redeclaration with other arguments."""
        d = self.transport.declare_queue(name, durable=True, arguments=DURABLE_ADDRESS_ARGUMENTS)
        return d.addCallback(self._declared_address, name)

    def _declared_address(self, result: Any, name: str) -> Any:
        self.addresses.mark((name,), True)
        return result

    def open_stream(self, address: str, metadata: Dict[str, Any], *, correlation_id: Optional[str] = None,
                    chunk_size: int = stream.DEFAULT_CHUNK_SIZE, window: int = stream.DEFAULT_WINDOW) -> stream.StreamWriter:
        """Start a stream to C{address}; write to the returned writer, then finish it."""
        return stream.StreamWriter(lambda m: self.send(address, m), metadata, correlation_id=correlation_id,
                                   chunk_size=chunk_size, window=window)

    def send_stream(self, address: str, metadata: Dict[str, Any], chunks: Iterable[bytes], **options: Any) -> Deferred:
        """Stream every chunk of an iterable to C{address}; fires with the byte count."""
        return stream.send_stream(self.open_stream(address, metadata, **options), chunks)


class _Call:
    """A call waiting for its reply."""

    __slots__ = ("deferred", "address", "op", "started")

    def __init__(self, deferred: Deferred, address: str, op: str, started: float) -> None:
        self.deferred = deferred
        self.address = address
        self.op = op
        self.started = started

    def finish(self, bus: Bus, result: Any) -> None:
        failed = isinstance(result, Failure)
        bus.observer.rpc_latency(self.address, self.op, time.monotonic() - self.started,
                                 "error" if failed else "ok")
        if failed:
            self.deferred.errback(result)
        else:
            self.deferred.callback(result)


class _Deadlines:
    """Many timeouts on one timer.

    An entry expires at its deadline: the timer is set for the earliest
    deadline among the entries, and when it fires every overdue entry
    expires. Adding or removing an entry costs a dict operation, not a
    DelayedCall (a heap push and a cancellation) per send or call.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.entries: Dict[Any, Tuple[float, Callable[..., None], tuple]] = {}
        self._timer: Any = None
        self._at = math.inf

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, key: Any, seconds: float, expire: Callable[..., None], *args: Any) -> None:
        deadline = self.clock.seconds() + seconds
        self.entries[key] = (deadline, expire, args)
        if deadline < self._at:
            self._schedule(deadline)

    def remove(self, key: Any) -> None:
        self.entries.pop(key, None)
        # the timer stays: when it fires with nothing overdue it is set again

    def _schedule(self, at: float) -> None:
        delay = max(0.0, at - self.clock.seconds())
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(delay)
        else:
            self._timer = self.clock.callLater(delay, self._fire)
        self._at = at

    def _fire(self) -> None:
        self._timer = None
        self._at = math.inf
        now = self.clock.seconds() + 1e-9  # float rounding of now + (deadline - now)
        entries = self.entries
        overdue = [key for key, (deadline, _, _) in entries.items() if deadline <= now]
        for key in overdue:
            entry = entries.pop(key, None)
            if entry is not None:
                try:
                    entry[1](*entry[2])
                except Exception:
                    Bus.log.failure("expiring a wait")
        if entries and self._timer is None:
            self._schedule(min(deadline for deadline, _, _ in entries.values()))


def _run(handler: Handler, message: Message) -> Any:
    """C{handler(message)}: its value if it finished synchronously, else a
    Deferred (what it returned, a failed one if it raised, or one for a
    coroutine), as C{maybeDeferred} would but without a Deferred for a
    plain value."""
    try:
        result = handler(message)
    except Exception:
        return fail()
    if isinstance(result, (Deferred, CoroutineType, Failure)):
        return maybeDeferred(lambda: result)
    return result


class _Shared:
    """One piece of setup that many wait for (the reply address, the shared
    dead-letter queue): the first L{wait} starts it, every wait gets its
    result; a failure fails every waiter (none is left unhandled) and the
    next wait starts it again."""

    def __init__(self, start: Callable[[], Deferred]) -> None:
        self._start = start
        self._done = False
        self._value: Any = None
        self._running = False
        self._waiters: List[Deferred] = []

    def wait(self) -> Deferred:
        if self._done:
            return succeed(self._value)
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        if not self._running:
            self._running = True
            try:
                started = self._start()
            except Exception:  # noqa: BLE001 - a failure to start is the setup's failure
                started = fail()
            started.addBoth(self._settled)  # (at once, if it is done or failed already)
        return waiter

    def _settled(self, result: Any) -> None:
        self._running = False
        if not isinstance(result, Failure):
            self._done, self._value = True, result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


def _raise(exc: Exception) -> None:
    raise exc
