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
"""
from __future__ import annotations

import time
import uuid
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from magnet import rpc, stream
from magnet.errors import BadMessage, ConnectionLost, MagnetError, Refusal, RemoteError, Timeout
from magnet.message import Message
from magnet.observer import BusObserver
from magnet.transport import DEFAULT_EXCHANGE, Delivery, Transport

Handler = Callable[[Message], Any]

WORKER = "worker"
FANOUT = "fanout"
ATTEMPT_HEADER = "x-magnet-attempt"
ERROR_HEADER = "x-magnet-error"
ORIGIN_HEADER = "x-magnet-origin"
DEAD_SUFFIX = ".dead"
SHARED_DEAD_LETTERS = "magnet.dead-letters"


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
        d = self.subscription.cancel() if self.subscription else succeed(None)
        d.addCallback(lambda _: self.bus.transport.delete_queue(self.address))
        return d

    def _on_message(self, message: Message, delivery: Delivery) -> Optional[Deferred]:
        if message.type in stream.STREAM_TYPES:
            return self._on_stream_message(message)
        if self._handler is not None:
            return maybeDeferred(self._handler, message)
        if self._getters:
            self._getters.popleft().callback(message)
            return None
        self._messages.append(delivery)
        return _HELD

    def _on_stream_message(self, message: Message) -> Deferred:
        sid = message.headers.get(stream.STREAM_HEADER)
        if not isinstance(sid, str):
            raise BadMessage(f"stream message without a {stream.STREAM_HEADER!r} header")
        if message.type == stream.START:
            s = stream.Stream(sid, message.json(), message.correlation_id, self.bus.clock,
                              self._idle_timeout, self._streams.pop)
            s._expected = message.headers.get(stream.SEQ_HEADER, 0) + 1
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
        self._inflight: Dict[int, Deferred] = {}
        self._inflight_ids = 0
        self._pending_calls: Dict[str, Deferred] = {}
        self._reply_listener: Optional[Deferred] = None
        self._dead_letters_declared: Optional[Deferred] = None
        self._accepting = True
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
                      timeout=self.shutdown_timeout, count=len(self._inflight))
        waits = DeferredList([_observe(d) for d in self._inflight.values()], consumeErrors=True)
        waits.addTimeout(self.shutdown_timeout, self.clock)
        waits.addErrback(lambda _: self.log.warn(
            "{count} handlers still running after {timeout} s; their messages will be redelivered",
            count=len(self._inflight), timeout=self.shutdown_timeout))
        return waits

    def _link_changed(self, up: bool) -> None:
        if not up:
            self._fail_pending(ConnectionLost("connection to the broker lost while waiting for a reply"))

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending_calls = self._pending_calls, {}
        for d in pending.values():
            d.errback(Failure(exc))

    def when_connected(self, timeout: Optional[float] = None) -> Deferred:
        return self.transport.when_connected(self.send_timeout if timeout is None else timeout)

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
        d = self.transport.publish(exchange, key, message, mandatory=mandatory)
        timeout = self.send_timeout if timeout is None else timeout
        d.addTimeout(timeout, self.clock, onTimeoutCancel=lambda r, t: _raise(
            Timeout(f"send to {address!r} not confirmed within {t} s")))
        self.observer.message_out(address)
        return d

    def send_json(self, address: str, value: Any, **properties: Any) -> Deferred:
        return self.send(address, Message.of_json(value, **properties))

    # consuming -------------------------------------------------------------

    def consume(self, name: str, handler: Handler, *, prefetch: Optional[int] = None) -> Deferred:
        """Compete for the messages of worker queue C{name}; fires with a L{Subscription}."""
        return self._consume(name, lambda m, _d: maybeDeferred(handler, m), prefetch)

    def subscribe(self, fanout: str, handler: Handler, *, prefetch: Optional[int] = None) -> Deferred:
        """Receive a copy of every message sent to fanout C{fanout} from now on."""
        queue = f"{fanout}.sub.{self.node}.{uuid.uuid4().hex[:12]}"
        d = self.declare_fanout(fanout)
        d.addCallback(lambda _: self.transport.declare_queue(queue, durable=False, exclusive=True, auto_delete=True))
        d.addCallback(lambda _: self.transport.bind_queue(queue, fanout))
        d.addCallback(lambda _: self.consume(queue, handler, prefetch=prefetch))
        return d

    def _consume(self, name: str, handle: Callable[[Message, Delivery], Any], prefetch: Optional[int]) -> Deferred:
        subscription = Subscription(self, name)
        self._subscriptions.add(subscription)

        def on_delivery(delivery: Delivery) -> None:
            self._handle(subscription, delivery, handle)

        d = self.transport.consume(name, on_delivery, prefetch=self.prefetch if prefetch is None else prefetch)

        def started(consumer: Any) -> Subscription:
            subscription._consumer = consumer
            if subscription.cancelled:
                consumer.cancel()
            return subscription

        def failed(failure: Failure) -> Failure:
            self._subscriptions.discard(subscription)
            return failure

        return d.addCallbacks(started, failed)

    def _handle(self, subscription: Subscription, delivery: Delivery, handle: Callable[[Message, Delivery], Any]) -> None:
        message = delivery.message
        name = subscription.name
        self.observer.message_in(name)
        if not self._accepting or subscription.cancelled:
            delivery.nack(requeue=True)
            return
        # Count the handler as in flight before it runs: it may call back into
        # code that stops the bus before it even returns.
        key = self._inflight_ids = self._inflight_ids + 1
        tracker: Deferred = Deferred()
        self._inflight[key] = tracker
        self.observer.inflight(name, +1)

        def finally_(_: Any) -> None:
            del self._inflight[key]
            self.observer.inflight(name, -1)
            tracker.callback(None)

        try:
            result = handle(message, delivery)
        except Exception:
            result = fail()
        if result is _HELD:
            finally_(None)
            return
        if result is None:
            delivery.ack()
            finally_(None)
            return

        def failed(failure: Failure) -> Optional[Deferred]:
            return self._handler_failed(name, delivery, failure)

        result.addCallbacks(lambda _: delivery.ack(), failed)
        result.addErrback(lambda f: self.log.failure("settling a message from {name}", f, name=name))
        result.addBoth(finally_)

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
        d.addCallbacks(lambda _: delivery.ack(), lambda f: self._settle_failed(delivery, f))
        return d

    def _settle_failed(self, delivery: Delivery, failure: Failure) -> None:
        self.log.error("could not retry or dead-letter a message from {queue} ({reason}); giving it back to the broker",
                       queue=delivery.queue, reason=failure.getErrorMessage())
        delivery.nack(requeue=True)

    def _ensure_shared_dead_letters(self) -> Deferred:
        if self._dead_letters_declared is None:
            self._dead_letters_declared = self.transport.declare_queue(SHARED_DEAD_LETTERS, durable=True)
            self._dead_letters_declared.addErrback(self._forget_dead_letters)
        return _observe(self._dead_letters_declared)

    def _forget_dead_letters(self, failure: Failure) -> Failure:
        self._dead_letters_declared = None
        return failure

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

    def _answer(self, name: str, ops: Dict[str, Callable[..., Any]], message: Message) -> Deferred:
        result = rpc.invoke(ops, name, message)
        if not message.reply_to:
            return result.addCallback(lambda _: None)

        def answer(reply: Message) -> Deferred:
            d = self.transport.publish(DEFAULT_EXCHANGE, message.reply_to, reply, mandatory=True)
            d.addErrback(lambda f: self.log.warn(
                "reply from {name} to {reply_to} could not be delivered: {reason}",
                name=name, reply_to=message.reply_to, reason=f.getErrorMessage()))
            return d

        def failed(failure: Failure) -> Deferred:
            self.observer.handler_error(name)
            if failure.check(RemoteError, BadMessage, Refusal, LookupError, ValueError):
                self.log.info("{name}: {op} refused: {error}", name=name, op=message.headers.get(rpc.OP_HEADER),
                              error=f"{failure.type.__name__}: {failure.getErrorMessage()}")
            else:
                self.log.failure("operation on {name} failed", failure, name=name)
            return answer(rpc.error_reply(failure, message.correlation_id))

        def succeeded(value: Any) -> Deferred:
            try:
                reply = rpc.reply(value, message.correlation_id)
            except (TypeError, ValueError) as e:
                return failed(Failure(TypeError(f"result is not JSON-serializable: {e}")))
            return answer(reply)

        return result.addCallbacks(succeeded, failed)

    def call(self, address: str, op: str, /, *, timeout: Optional[float] = None, **kwargs: Any) -> Deferred:
        """Call C{op} on the service at C{address} with keyword arguments; fires
        with its result, or fails with L{RemoteError}, L{Timeout},
        L{ConnectionLost} or L{Unroutable}."""
        return self.call_with(address, op, kwargs, timeout=timeout)

    def call_with(self, address: str, op: str, kwargs: Dict[str, Any], *, timeout: Optional[float] = None) -> Deferred:
        """L{call} with the arguments as a dict, for callers that relay
        arguments they did not write (any name, C{timeout} included)."""
        timeout = self.rpc_timeout if timeout is None else timeout
        correlation_id = uuid.uuid4().hex
        started = time.monotonic()
        d: Deferred = Deferred(lambda _: self._pending_calls.pop(correlation_id, None))
        self._pending_calls[correlation_id] = d

        def publish(reply_to: str) -> Deferred:
            try:
                message = rpc.request(op, kwargs, reply_to=reply_to, correlation_id=correlation_id)
            except (TypeError, ValueError) as e:
                raise TypeError(f"arguments of {address}.{op} are not JSON-serializable: {e}") from None
            return self.transport.publish(DEFAULT_EXCHANGE, address, message, mandatory=True)

        def not_sent(failure: Failure) -> None:
            pending = self._pending_calls.pop(correlation_id, None)
            if pending is not None:
                pending.errback(failure)

        sent = self._reply_address()
        sent.addCallback(publish)
        sent.addErrback(not_sent)
        self.observer.message_out(address)

        def timed_out(result: Any, t: float) -> None:
            self._pending_calls.pop(correlation_id, None)
            raise Timeout(f"{address}.{op} got no reply within {t} s")

        def measured(result: Any) -> Any:
            outcome = "error" if isinstance(result, Failure) else "ok"
            self.observer.rpc_latency(address, op, time.monotonic() - started, outcome)
            return result

        d.addTimeout(timeout, self.clock, onTimeoutCancel=timed_out)
        d.addBoth(measured)
        return d

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
        return self.send(address, rpc.request(op, kwargs))

    def _reply_address(self) -> Deferred:
        if self._reply_listener is None:
            self._reply_listener = self.listen(self._on_reply, prefetch=0)
            self._reply_listener.addCallback(lambda listener: listener.address)
            self._reply_listener.addErrback(self._forget_reply_listener)
        return _observe(self._reply_listener)

    def _forget_reply_listener(self, failure: Failure) -> Failure:
        self._reply_listener = None
        return failure

    def _on_reply(self, message: Message) -> None:
        d = self._pending_calls.pop(message.correlation_id or "", None)
        if d is None:
            self.log.debug("reply {cid} arrived after its call ended", cid=message.correlation_id)
            return
        try:
            value = rpc.decode_reply(message)
        except MagnetError:
            d.errback(Failure())
        else:
            d.callback(value)

    # listen addresses and streams --------------------------------------------

    def listen(self, handler: Optional[Handler] = None, *, name: Optional[str] = None, shared: bool = False,
               durable: bool = False, prefetch: Optional[int] = None,
               on_stream: Optional[Callable[[stream.Stream], Any]] = None) -> Deferred:
        """Make an address others can send to; fires with a L{Listener}.

        Private by default (only this connection consumes it; it goes when the
        bus stops). C{shared}: other consumers may join it as a worker queue.
        C{durable}: it outlives its consumers, so what arrives while they are
        away is kept (a named durable subscription). C{on_stream} is called
        with each stream as it starts; without it, take streams with
        L{Listener.next_stream}."""
        address = name or f"magnet.listen.{self.node}.{uuid.uuid4().hex}"
        listener = Listener(self, address, handler, self.stream_idle_timeout, on_stream)
        if durable:
            d = self.transport.declare_queue(address, durable=True)
        else:
            d = self.transport.declare_queue(address, durable=False, exclusive=not shared, auto_delete=True)
        d.addCallback(lambda _: self._consume(address, listener._on_message, prefetch))

        def ready(subscription: Subscription) -> Listener:
            listener.subscription = subscription
            return listener

        return d.addCallback(ready)

    def open_stream(self, address: str, metadata: Dict[str, Any], *, correlation_id: Optional[str] = None,
                    chunk_size: int = stream.DEFAULT_CHUNK_SIZE, window: int = stream.DEFAULT_WINDOW) -> stream.StreamWriter:
        """Start a stream to C{address}; write to the returned writer, then finish it."""
        return stream.StreamWriter(lambda m: self.send(address, m), metadata, correlation_id=correlation_id,
                                   chunk_size=chunk_size, window=window)

    def send_stream(self, address: str, metadata: Dict[str, Any], chunks: Iterable[bytes], **options: Any) -> Deferred:
        """Stream every chunk of an iterable to C{address}; fires with the byte count."""
        return stream.send_stream(self.open_stream(address, metadata, **options), chunks)


def _observe(d: Deferred) -> Deferred:
    """A new Deferred with C{d}'s result, leaving C{d} as it is for others."""
    out: Deferred = Deferred()

    def both(result: Any) -> Any:
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return result

    d.addBoth(both)
    return out


def _raise(exc: Exception) -> None:
    raise exc
