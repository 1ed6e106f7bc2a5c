"""The baseline: the group's work done with txAMQP's documented API, nothing more.

Connections are made with C{ClientCreator(reactor, AMQClient, ...)} and
C{authenticate}; consumers are C{basic_consume} plus a C{client.queue(tag)}
get loop; messages are C{Content} with properties; publisher confirms are
C{confirm_select} and the broker's C{basic.ack} / C{basic.nack} handled in a
L{TwistedDelegate} subclass. The spec file is magnet's
(C{magnet/spec/amqp0-9-1-rabbitmq.xml}), so both sides speak the same protocol
definition.

The work mirrors magnet's guarantees (see L{bench.magnet_bench}):
  - every publish is C{mandatory} on a channel in confirm mode;
  - consumers use manual acks, prefetch 10 (magnet's default), and ack a
    message only after it has been handled;
  - an RPC server acks a request once the broker has confirmed its reply;
    replies are consumed with manual acks and no prefetch limit;
  - worker-queue and fanout messages are persistent (delivery-mode 2) to
    durable queues / a durable exchange; RPC messages are transient.
"""
from __future__ import annotations

import functools
import itertools
import uuid
from importlib import resources
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientCreator
from twisted.python.failure import Failure
from txamqp import spec as txspec
from txamqp.client import Closed, TwistedDelegate
from txamqp.content import Content
from txamqp.protocol import AMQClient
from txamqp.queue import Closed as QueueClosed

from bench.harness import ClosedLoop, Pipeline, Settings

PREFETCH = 10


@functools.lru_cache(maxsize=None)
def load_spec() -> Any:
    resource = resources.files("magnet") / "spec" / "amqp0-9-1-rabbitmq.xml"
    with resources.as_file(resource) as path:
        return txspec.load(str(path))


def parse_broker(url: str) -> Dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme != "amqp":
        raise ValueError(f"the raw txAMQP baseline speaks amqp:// only, not {url!r}")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return {"host": parts.hostname or "127.0.0.1", "port": parts.port or 5672,
            "username": unquote(parts.username or "guest"), "password": unquote(parts.password or "guest"),
            "vhost": vhost}


class PublishFailed(Exception):
    """The broker nacked or returned a publish."""


class _Confirms:
    """Publisher-confirm bookkeeping for one channel in confirm mode."""

    def __init__(self) -> None:
        self.seq = 0
        self.pending: Dict[int, Deferred] = {}
        self.on_return: Optional[Callable[[Failure], None]] = None

    def next(self) -> Deferred:
        self.seq += 1
        d: Deferred = Deferred()
        self.pending[self.seq] = d
        return d

    def settle(self, tag: int, multiple: bool, ok: bool) -> None:
        tags = [t for t in self.pending if t <= tag] if multiple else [tag]
        for t in tags:
            d = self.pending.pop(t, None)
            if d is None:
                continue
            if ok:
                d.callback(None)
            else:
                d.errback(Failure(PublishFailed(f"broker nacked publish {t}")))


class RawDelegate(TwistedDelegate):
    """txAMQP's delegate plus the server-sent methods of publisher confirms."""

    def basic_ack(self, ch: Any, msg: Any) -> None:
        confirms = self.client.confirms.get(ch.id)
        if confirms is not None:
            confirms.settle(msg.delivery_tag, msg.multiple, ok=True)

    def basic_nack(self, ch: Any, msg: Any) -> None:
        confirms = self.client.confirms.get(ch.id)
        if confirms is not None:
            confirms.settle(msg.delivery_tag, msg.multiple, ok=False)

    def basic_return_(self, ch: Any, msg: Any) -> None:
        confirms = self.client.confirms.get(ch.id)
        failure = Failure(PublishFailed(f"message returned: {msg.reply_code} {msg.reply_text}"))
        if confirms is not None and confirms.on_return is not None:
            confirms.on_return(failure)


class RawConnection:
    """One txAMQP connection and the channels opened on it."""

    def __init__(self, client: AMQClient) -> None:
        self.client = client
        client.confirms = {}
        self._ids = itertools.count(1)

    @classmethod
    @inlineCallbacks
    def open(cls, reactor: Any, broker: str) -> Any:
        b = parse_broker(broker)
        creator = ClientCreator(reactor, AMQClient, delegate=RawDelegate(), vhost=b["vhost"],
                                spec=load_spec(), heartbeat=0, clock=reactor)
        client = yield creator.connectTCP(b["host"], b["port"], timeout=10)
        yield client.authenticate(b["username"], b["password"])
        return cls(client)

    @inlineCallbacks
    def channel(self, confirm: bool = False) -> Any:
        ch = yield self.client.channel(next(self._ids))
        yield ch.channel_open()
        if confirm:
            yield ch.confirm_select(nowait=False)
            self.client.confirms[ch.id] = _Confirms()
        return ch

    def publish(self, ch: Any, exchange: str, routing_key: str, body: bytes, **properties: Any) -> Deferred:
        """basic.publish (mandatory) on a confirm channel; fires on the broker's ack."""
        confirm = self.client.confirms[ch.id].next()
        ch.basic_publish(exchange=exchange, routing_key=routing_key, mandatory=True,
                         content=Content(body, properties=properties))
        return confirm

    @inlineCallbacks
    def consume(self, ch: Any, queue: str, handle: Callable[[Any, Any], Any]) -> Any:
        """basic.consume with manual acks; C{handle(ch, msg)} runs for each delivery.
        Fires with the consumer tag once the broker has registered the consumer."""
        tag = f"bench.{uuid.uuid4().hex[:12]}"
        yield ch.basic_consume(queue=queue, consumer_tag=tag, no_ack=False)
        q = yield self.client.queue(tag)
        self._get_loop(q, ch, handle)
        return tag

    @inlineCallbacks
    def _get_loop(self, q: Any, ch: Any, handle: Callable[[Any, Any], Any]) -> Any:
        while True:
            try:
                msg = yield q.get()
            except (QueueClosed, Closed):
                return
            try:
                handle(ch, msg)
            except Exception:
                Failure().printTraceback()

    @inlineCallbacks
    def cancel(self, ch: Any, tag: str) -> Any:
        yield ch.basic_cancel(consumer_tag=tag)
        q = yield self.client.queue(tag)
        q.close()
        del self.client.queues[tag]

    @inlineCallbacks
    def close_channel(self, ch: Any) -> Any:
        self.client.confirms.pop(ch.id, None)
        if not ch.closed:
            yield ch.channel_close()
        self.client.channels.pop(ch.id, None)

    def close(self) -> Deferred:
        return self.client.close(within=3)


@inlineCallbacks
def delete(reactor: Any, broker: str, queues: List[str] = (), exchanges: List[str] = ()) -> Any:
    """Delete queues and exchanges on a connection of its own (used by both sides' cleanup)."""
    conn = yield RawConnection.open(reactor, broker)
    try:
        ch = yield conn.channel()
        for q in queues:
            yield ch.queue_delete(queue=q)
        for x in exchanges:
            yield ch.exchange_delete(exchange=x)
        yield conn.close_channel(ch)
    finally:
        yield conn.close()


class RawTxAMQP:
    """The baseline side: a caller/producer connection and a server/consumer connection."""

    def __init__(self, reactor: Any, settings: Settings) -> None:
        self.reactor = reactor
        self.settings = settings
        self.front: Optional[RawConnection] = None  # callers, producers
        self.back: Optional[RawConnection] = None  # servers, consumers

    @inlineCallbacks
    def open(self) -> Any:
        self.front = yield RawConnection.open(self.reactor, self.settings.broker)
        self.back = yield RawConnection.open(self.reactor, self.settings.broker)

    @inlineCallbacks
    def close(self) -> Any:
        for conn in (self.front, self.back):
            if conn is not None:
                yield conn.close()

    def _name(self, kind: str) -> str:
        return f"bench.raw.{kind}.{uuid.uuid4().hex[:10]}"

    # RPC -------------------------------------------------------------------

    @inlineCallbacks
    def rpc(self, concurrency: int, size: int = 100) -> Any:
        front, back = self.front, self.back
        name = self._name("rpc")
        reply_queue = self._name("reply")
        body = b"x" * size
        pending: Dict[str, Deferred] = {}

        # server: a durable work queue, prefetch 10, reply then ack once the reply is confirmed
        server_in = yield back.channel()
        server_out = yield back.channel(confirm=True)
        yield server_in.queue_declare(queue=name, durable=True)
        yield server_in.basic_qos(prefetch_count=PREFETCH)

        def serve(ch: Any, msg: Any) -> None:
            props = msg.content.properties
            d = back.publish(server_out, "", props["reply-to"], msg.content.body,
                             **{"correlation-id": props["correlation-id"], "delivery-mode": 1})
            d.addCallback(lambda _: ch.basic_ack(delivery_tag=msg.delivery_tag))
            d.addErrback(load.failed)

        server_tag = yield back.consume(server_in, name, serve)

        # caller: a private reply queue (manual acks, no prefetch limit) and a confirm channel
        caller_in = yield front.channel()
        caller_out = yield front.channel(confirm=True)
        yield caller_in.queue_declare(queue=reply_queue, exclusive=True, auto_delete=True)

        def on_reply(ch: Any, msg: Any) -> None:
            ch.basic_ack(delivery_tag=msg.delivery_tag)
            d = pending.pop(msg.content.properties.get("correlation-id"), None)
            if d is not None:
                d.callback(msg.content.body)

        reply_tag = yield front.consume(caller_in, reply_queue, on_reply)

        def call() -> Deferred:
            cid = uuid.uuid4().hex
            d: Deferred = Deferred()
            pending[cid] = d
            sent = front.publish(caller_out, "", name, body,
                                 **{"reply-to": reply_queue, "correlation-id": cid, "delivery-mode": 1})

            def not_sent(failure: Failure) -> None:
                waiting = pending.pop(cid, None)
                if waiting is not None:
                    waiting.errback(failure)

            sent.addErrback(not_sent)
            return d

        load = ClosedLoop(self.reactor, call, concurrency, self.settings.drain_timeout)
        self.front.client.confirms[caller_out.id].on_return = load.failed

        @inlineCallbacks
        def cleanup() -> Any:
            yield front.cancel(caller_in, reply_tag)
            yield back.cancel(server_in, server_tag)
            for conn, ch in ((front, caller_in), (front, caller_out), (back, server_in), (back, server_out)):
                yield conn.close_channel(ch)
            yield delete(self.reactor, self.settings.broker, queues=[name, reply_queue])

        load.on_close(cleanup)
        yield call()  # one round trip before timing: the path works
        return load

    # worker queue ------------------------------------------------------------

    @inlineCallbacks
    def worker_queue(self, window: int = 100, size: int = 100) -> Any:
        front, back = self.front, self.back
        name = self._name("work")
        body = b"x" * size
        consumer_ch = yield back.channel()
        producer_ch = yield front.channel(confirm=True)
        yield consumer_ch.queue_declare(queue=name, durable=True)
        yield consumer_ch.basic_qos(prefetch_count=PREFETCH)

        def publish() -> Deferred:
            return front.publish(producer_ch, "", name, body, **{"delivery-mode": 2})

        load = Pipeline(self.reactor, publish, copies=1, window=window, drain_timeout=self.settings.drain_timeout)
        front.client.confirms[producer_ch.id].on_return = load.failed

        def handle(ch: Any, msg: Any) -> None:
            load.delivered()
            ch.basic_ack(delivery_tag=msg.delivery_tag)

        tag = yield back.consume(consumer_ch, name, handle)

        @inlineCallbacks
        def cleanup() -> Any:
            yield back.cancel(consumer_ch, tag)
            yield back.close_channel(consumer_ch)
            yield front.close_channel(producer_ch)
            yield delete(self.reactor, self.settings.broker, queues=[name])

        load.on_close(cleanup)
        return load

    # fanout ----------------------------------------------------------------

    @inlineCallbacks
    def fanout(self, subscribers: int = 10, window: int = 100, size: int = 100) -> Any:
        front, back = self.front, self.back
        name = self._name("fanout")
        body = b"x" * size
        producer_ch = yield front.channel(confirm=True)
        yield producer_ch.exchange_declare(exchange=name, type="fanout", durable=True)

        def publish() -> Deferred:
            return front.publish(producer_ch, name, "", body, **{"delivery-mode": 2})

        load = Pipeline(self.reactor, publish, copies=subscribers, window=window,
                        drain_timeout=self.settings.drain_timeout)
        front.client.confirms[producer_ch.id].on_return = load.failed

        def handle(ch: Any, msg: Any) -> None:
            load.delivered()
            ch.basic_ack(delivery_tag=msg.delivery_tag)

        consumers = []
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
                yield back.cancel(ch, tag)
                yield back.close_channel(ch)  # auto-delete queues go with their consumer
            yield front.close_channel(producer_ch)
            yield delete(self.reactor, self.settings.broker, exchanges=[name])

        load.on_close(cleanup)
        return load
