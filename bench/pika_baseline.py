"""A baseline: the group's work done with pika's Twisted adapter.

A benchmark-only dependency (the C{bench} extra). Connections are
C{ClientCreator(reactor, TwistedProtocolConnection, ConnectionParameters)}
and its C{ready} Deferred; channels are L{TwistedChannel}s; consumers are
C{basic_consume} plus a get loop on the returned C{ClosableDeferredQueue}
(pika's documented Twisted API); publisher confirms are
C{confirm_delivery()}, after which C{basic_publish} returns a Deferred that
fires on the broker's ack (and fails on a nack or a return).

The work mirrors magnet's and raw txAMQP's guarantees (see
L{bench.magnet_bench} and L{bench.raw_txamqp}):
  - every publish is C{mandatory} on a channel in confirm mode;
  - consumers use manual acks, prefetch 10, and ack a message only after it
    has been handled;
  - an RPC server acks a request once the broker has confirmed its reply;
    replies are consumed with manual acks and no prefetch limit;
  - worker-queue and fanout messages are persistent (delivery-mode 2) to
    durable queues / a durable exchange; RPC messages are transient.

L{PikaTwistedNoConfirms} is the same work B{without} publisher confirms,
what most pika users run: C{basic_publish} returns an already-fired
Deferred, so a producer's only limit is the window of messages not yet
consumed, and an RPC server acks a request as soon as its reply is written.
Publishes stay C{mandatory} (a return would only be logged), everything
else (persistence, manual acks after the handler, prefetch) is as above.
"""
from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, List, Optional

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientCreator
from twisted.python.failure import Failure

from bench.harness import ClosedLoop, Pipeline, Settings
from bench.raw_txamqp import parse_broker

PREFETCH = 10


class PikaConnection:
    """One pika TwistedProtocolConnection and the channels opened on it."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    @classmethod
    @inlineCallbacks
    def open(cls, reactor: Any, broker: str) -> Any:
        import pika
        from pika.adapters.twisted_connection import TwistedProtocolConnection

        b = parse_broker(broker)
        parameters = pika.ConnectionParameters(
            host=b["host"], port=b["port"], virtual_host=b["vhost"],
            credentials=pika.PlainCredentials(b["username"], b["password"]), heartbeat=0)
        creator = ClientCreator(reactor, TwistedProtocolConnection, parameters)
        connection = yield creator.connectTCP(b["host"], b["port"], timeout=10)
        yield connection.ready
        return cls(connection)

    @inlineCallbacks
    def channel(self, confirm: bool = False) -> Any:
        ch = yield self.connection.channel()
        if confirm:
            yield ch.confirm_delivery()
        return ch

    @staticmethod
    def publish(ch: Any, exchange: str, routing_key: str, body: bytes, properties: Any) -> Deferred:
        """basic.publish (mandatory); on a confirm channel it fires on the broker's ack, else at once."""
        return ch.basic_publish(exchange=exchange, routing_key=routing_key, body=body,
                                properties=properties, mandatory=True)

    @inlineCallbacks
    def consume(self, ch: Any, queue: str, handle: Callable[[Any, Any, Any, bytes], Any]) -> Any:
        """basic.consume with manual acks; C{handle(ch, method, properties, body)}
        runs for each delivery. Fires with the consumer tag."""
        queue_object, tag = yield ch.basic_consume(queue=queue, auto_ack=False)
        self._get_loop(queue_object, handle)
        return tag

    @staticmethod
    @inlineCallbacks
    def _get_loop(queue_object: Any, handle: Callable[..., Any]) -> Any:
        while True:
            try:
                ch, method, properties, body = yield queue_object.get()
            except Exception:
                return  # the queue was closed (consumer cancelled, channel closed)
            try:
                handle(ch, method, properties, body)
            except Exception:
                Failure().printTraceback()


class PikaTwisted:
    """The side: a caller/producer connection and a server/consumer connection."""

    #: publish on channels in confirm mode (a publish's Deferred fires on the broker's ack)
    confirms = True

    def __init__(self, reactor: Any, settings: Settings) -> None:
        self.reactor = reactor
        self.settings = settings
        self.front: Optional[PikaConnection] = None
        self.back: Optional[PikaConnection] = None

    @inlineCallbacks
    def open(self) -> Any:
        self.front = yield PikaConnection.open(self.reactor, self.settings.broker)
        self.back = yield PikaConnection.open(self.reactor, self.settings.broker)

    @inlineCallbacks
    def close(self) -> Any:
        for conn in (self.front, self.back):
            if conn is not None and not conn.connection.is_closed:
                yield conn.connection.close()

    def _name(self, kind: str) -> str:
        return f"bench.pika.{kind}.{uuid.uuid4().hex[:10]}"

    # RPC -------------------------------------------------------------------

    @inlineCallbacks
    def rpc(self, concurrency: int, size: int = 100) -> Any:
        import pika

        front, back = self.front, self.back
        name = self._name("rpc")
        reply_queue = self._name("reply")
        body = b"x" * size
        pending: Dict[str, Deferred] = {}

        server_in = yield back.channel()
        server_out = yield back.channel(confirm=self.confirms)
        yield server_in.queue_declare(queue=name, durable=True)
        yield server_in.basic_qos(prefetch_count=PREFETCH)

        def serve(ch: Any, method: Any, properties: Any, data: bytes) -> None:
            reply = pika.BasicProperties(correlation_id=properties.correlation_id, delivery_mode=1)
            d = front.publish(server_out, "", properties.reply_to, data, reply)
            tag = method.delivery_tag
            d.addCallback(lambda _: ch.basic_ack(delivery_tag=tag))
            d.addErrback(load.failed)

        server_tag = yield back.consume(server_in, name, serve)

        caller_in = yield front.channel()
        caller_out = yield front.channel(confirm=self.confirms)
        yield caller_in.queue_declare(queue=reply_queue, exclusive=True, auto_delete=True)

        def on_reply(ch: Any, method: Any, properties: Any, data: bytes) -> None:
            ch.basic_ack(delivery_tag=method.delivery_tag)
            d = pending.pop(properties.correlation_id, None)
            if d is not None:
                d.callback(data)

        reply_tag = yield front.consume(caller_in, reply_queue, on_reply)

        def call() -> Deferred:
            cid = uuid.uuid4().hex
            d: Deferred = Deferred()
            pending[cid] = d
            properties = pika.BasicProperties(reply_to=reply_queue, correlation_id=cid, delivery_mode=1)
            sent = front.publish(caller_out, "", name, body, properties)

            def not_sent(failure: Failure) -> None:
                waiting = pending.pop(cid, None)
                if waiting is not None:
                    waiting.errback(failure)

            sent.addErrback(not_sent)
            return d

        load = ClosedLoop(self.reactor, call, concurrency, self.settings.drain_timeout)

        @inlineCallbacks
        def cleanup() -> Any:
            yield caller_in.basic_cancel(reply_tag)
            yield server_in.basic_cancel(server_tag)
            yield server_in.queue_delete(queue=name)
            for ch in (caller_in, caller_out, server_in, server_out):
                yield _close(ch)

        load.on_close(cleanup)
        yield call()  # one round trip before timing: the path works
        return load

    # worker queue ------------------------------------------------------------

    @inlineCallbacks
    def worker_queue(self, window: int = 100, size: int = 100) -> Any:
        import pika

        front, back = self.front, self.back
        name = self._name("work")
        body = b"x" * size
        persistent = pika.BasicProperties(delivery_mode=2)
        consumer_ch = yield back.channel()
        producer_ch = yield front.channel(confirm=self.confirms)
        yield consumer_ch.queue_declare(queue=name, durable=True)
        yield consumer_ch.basic_qos(prefetch_count=PREFETCH)

        def publish() -> Deferred:
            return front.publish(producer_ch, "", name, body, persistent)

        load = Pipeline(self.reactor, publish, copies=1, window=window, drain_timeout=self.settings.drain_timeout)

        def handle(ch: Any, method: Any, _properties: Any, _body: bytes) -> None:
            load.delivered()
            ch.basic_ack(delivery_tag=method.delivery_tag)

        tag = yield back.consume(consumer_ch, name, handle)

        @inlineCallbacks
        def cleanup() -> Any:
            yield consumer_ch.basic_cancel(tag)
            yield consumer_ch.queue_delete(queue=name)
            yield _close(consumer_ch)
            yield _close(producer_ch)

        load.on_close(cleanup)
        return load

    # fanout ----------------------------------------------------------------

    @inlineCallbacks
    def fanout(self, subscribers: int = 10, window: int = 100, size: int = 100) -> Any:
        import pika

        front, back = self.front, self.back
        name = self._name("fanout")
        body = b"x" * size
        persistent = pika.BasicProperties(delivery_mode=2)
        producer_ch = yield front.channel(confirm=self.confirms)
        yield producer_ch.exchange_declare(exchange=name, exchange_type="fanout", durable=True)

        def publish() -> Deferred:
            return front.publish(producer_ch, name, "", body, persistent)

        load = Pipeline(self.reactor, publish, copies=subscribers, window=window,
                        drain_timeout=self.settings.drain_timeout)

        def handle(ch: Any, method: Any, _properties: Any, _body: bytes) -> None:
            load.delivered()
            ch.basic_ack(delivery_tag=method.delivery_tag)

        consumers: List[Any] = []
        for i in range(subscribers):
            ch = yield back.channel()
            queue = f"{name}.sub.{i}"
            yield ch.queue_declare(queue=queue, exclusive=True, auto_delete=True)
            yield ch.queue_bind(queue=queue, exchange=name)
            yield ch.basic_qos(prefetch_count=PREFETCH)
            tag = yield back.consume(ch, queue, handle)
            consumers.append((ch, tag))

        @inlineCallbacks
        def cleanup() -> Any:
            for ch, tag in consumers:
                yield ch.basic_cancel(tag)
                yield _close(ch)  # auto-delete queues go with their consumer
            yield producer_ch.exchange_delete(exchange=name)
            yield _close(producer_ch)

        load.on_close(cleanup)
        return load


class PikaTwistedNoConfirms(PikaTwisted):
    """The same side without publisher confirms (see the module's docstring)."""

    confirms = False


def _close(ch: Any) -> Deferred:
    """Close a TwistedChannel; fires once the broker has closed it."""
    d: Deferred = Deferred()
    if not ch.is_open:
        d.callback(None)
        return d
    ch._channel.add_on_close_callback(lambda *_: None if d.called else d.callback(None))
    ch.close()
    return d
