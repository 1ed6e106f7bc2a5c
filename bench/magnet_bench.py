"""Group C{magnet}: the messaging layer against pika's Twisted adapter and raw
txAMQP doing the same work (L{bench.pika_baseline}, L{bench.raw_txamqp}), and
against pika's Twisted adapter without publisher confirms, what most pika
users run (L{bench.pika_baseline.PikaTwistedNoConfirms}: fewer guarantees,
the bar magnet's own must reach).

Rows (100-byte messages, local broker, each side on two connections of its
own: callers / producers on one, servers / consumers on the other):

  1. sequential RPC: one call at a time; a request to a worker queue, the
     server replies to the caller's reply queue with the correlation id.
  2. RPC with 10 calls in flight.
  3. worker queue: persistent messages to a durable queue, published with
     publisher confirms, consumed with prefetch 10 and acked after handling;
     end to end, at most 100 messages outstanding (unconfirmed or not yet
     consumed). Unit: messages consumed per second.
  4. fanout to 10 subscribers: the same, through a fanout exchange to 10
     subscriber queues; at most 100 messages outstanding. Unit: deliveries
     per second (messages x 10).

magnet's side uses only the public API (C{magnet.connect}, C{Bus.serve} /
C{call}, C{declare_worker_queue}, C{consume}, C{declare_fanout},
C{subscribe}, C{send}) with its defaults (prefetch 10, mandatory publishes
with confirms, an RPC request acked once its reply is confirmed).
"""
from __future__ import annotations

import uuid
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks

from bench.harness import Benchmark, ClosedLoop, Group, Pipeline, Settings
from bench.pika_baseline import PikaTwisted, PikaTwistedNoConfirms
from bench.raw_txamqp import RawTxAMQP, delete

SIZE = 100


def _echo_service() -> Any:
    import magnet

    class EchoService:
        @magnet.operation
        def echo(self, data: str) -> str:
            return data

    return EchoService()


class Magnet:
    """The subject side: two buses (caller / producer, server / consumer)."""

    def __init__(self, reactor: Any, settings: Settings) -> None:
        self.reactor = reactor
        self.settings = settings
        self.front: Optional[Any] = None
        self.back: Optional[Any] = None

    @inlineCallbacks
    def open(self) -> Any:
        import magnet

        timeout = self.settings.setup_timeout
        self.front = magnet.connect(self.settings.broker, self.reactor, node="bench-front",
                                    rpc_timeout=timeout, send_timeout=timeout)
        self.back = magnet.connect(self.settings.broker, self.reactor, node="bench-back",
                                   rpc_timeout=timeout, send_timeout=timeout)
        for bus in (self.front, self.back):
            bus.startService()
            yield bus.when_connected(timeout)

    @inlineCallbacks
    def close(self) -> Any:
        for bus in (self.front, self.back):
            if bus is not None and bus.running:
                yield bus.stopService()

    def _name(self, kind: str) -> str:
        return f"bench.magnet.{kind}.{uuid.uuid4().hex[:10]}"

    @inlineCallbacks
    def rpc(self, concurrency: int) -> Any:
        name = self._name("rpc")
        data = "x" * (SIZE - len('{"data":""}'))  # a 100-byte JSON body
        subscription = yield self.back.serve(name, _echo_service())

        def call() -> Deferred:
            return self.front.call(name, "echo", data=data)

        load = ClosedLoop(self.reactor, call, concurrency, self.settings.drain_timeout)

        @inlineCallbacks
        def cleanup() -> Any:
            yield subscription.cancel()
            yield delete(self.reactor, self.settings.broker, queues=[name, name + ".dead"])

        load.on_close(cleanup)
        echoed = yield call()  # one round trip before timing: the path works
        assert echoed == data, echoed
        return load

    @inlineCallbacks
    def worker_queue(self, window: int = 100) -> Any:
        import magnet

        name = self._name("work")
        message = magnet.Message(body=b"x" * SIZE)
        yield self.back.declare_worker_queue(name)
        yield self.front.declare_worker_queue(name)

        def publish() -> Deferred:
            return self.front.send(name, message)

        load = Pipeline(self.reactor, publish, copies=1, window=window, drain_timeout=self.settings.drain_timeout)

        def handle(_message: Any) -> None:
            load.delivered()

        subscription = yield self.back.consume(name, handle)

        @inlineCallbacks
        def cleanup() -> Any:
            yield subscription.cancel()
            yield delete(self.reactor, self.settings.broker, queues=[name, name + ".dead"])

        load.on_close(cleanup)
        return load

    @inlineCallbacks
    def fanout(self, subscribers: int = 10, window: int = 100) -> Any:
        import magnet

        name = self._name("fanout")
        message = magnet.Message(body=b"x" * SIZE)
        yield self.front.declare_fanout(name)

        def publish() -> Deferred:
            return self.front.send(name, message)

        load = Pipeline(self.reactor, publish, copies=subscribers, window=window,
                        drain_timeout=self.settings.drain_timeout)

        def handle(_message: Any) -> None:
            load.delivered()

        subscriptions = []
        for _ in range(subscribers):
            subscriptions.append((yield self.back.subscribe(name, handle)))

        @inlineCallbacks
        def cleanup() -> Any:
            yield defer.gatherResults([s.cancel() for s in subscriptions], consumeErrors=True)
            yield delete(self.reactor, self.settings.broker, exchanges=[name])

        load.on_close(cleanup)
        return load


def group() -> Group:
    return Group(
        name="magnet",
        description="magnet's patterns against pika's Twisted adapter (with and without confirms) and raw txAMQP",
        subject="magnet",
        baselines=["pika (Twisted)", "pika (Twisted, no confirms)", "raw txAMQP"],
        sides={"magnet": Magnet, "pika (Twisted)": PikaTwisted,
               "pika (Twisted, no confirms)": PikaTwistedNoConfirms, "raw txAMQP": RawTxAMQP},
        benchmarks=[
            Benchmark("sequential RPC", "calls/s", lambda side: side.rpc(concurrency=1)),
            Benchmark("RPC, 10 in flight", "calls/s", lambda side: side.rpc(concurrency=10)),
            Benchmark("worker queue (persistent, confirmed, acked)", "messages/s",
                      lambda side: side.worker_queue(window=100)),
            Benchmark("fanout to 10 subscribers", "deliveries/s",
                      lambda side: side.fanout(subscribers=10, window=100)),
        ],
    )
